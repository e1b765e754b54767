"""What to quantize to: bit width, group size and how the step sizes start, validated once."""
from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_BITS = (2, 3, 4, 8)
# how s and z start (quant/fake_quant.py): the paper's min/max, the shrink of each group's range that
# minimises its weight error, or GPTQ on the block's calibration inputs (quant/gptq.py; min/max until
# Block-AP runs it on the data)
INITS = ("minmax", "clip", "gptq")


@dataclass(frozen=True)
class FormatGrid:
    """A serving format's own grid, which a run can train into exactly: `bits`-bit codes in groups of
    `group`, read as (code - `zero`) x d with one float16 d a group, d of either sign (llama.cpp's
    Q2_0, Q4_0 and Q8_0; ggml-common.h)."""
    bits: int
    group: int
    zero: int  # the format's fixed offset: the zero point is this, never trained
    gguf_type: str  # llama.cpp's name for the block type


# `grid` asym: the paper's uniform asymmetric grid (learned zero points); else a llama.cpp type's grid
GRIDS = {"q2_0": FormatGrid(2, 64, 1, "Q2_0"), "q4_0": FormatGrid(4, 32, 8, "Q4_0"),
         "q8_0": FormatGrid(8, 32, 128, "Q8_0")}


class QuantConfigError(ValueError):
    """A bit width or group size that cannot be used, with the fix in the message (settings in backquotes,
    shown as flags by the command line)."""


def _flag(default, dest: str, **flag):
    """A setting of the command line (config/declare.py reads this metadata key; quant/ sits below config/)."""
    return field(default=default, metadata={"eqat_flag": (dest, flag)})


@dataclass(frozen=True)
class QuantConfig:
    bits: int = _flag(2, "wbits", help="weight bits: 2, 3, 4 or 8", kind=int)
    group_size: int = _flag(64, "group_size", help="group size (-1 = per channel)", kind=int)  # -1: per output row
    init: str = _flag("minmax", "init", by_rule=True, choices=INITS, help=(
        "how step sizes and zero points start: minmax (the paper's), clip (each group's range shrunk to its least "
        "weight error) or gptq (GPTQ on each block's calibration inputs); default: the recipe's"))
    grid: str = _flag("asym", "grid", choices=("asym", *GRIDS), help=(
        "asym: the paper's grid (each group's zero point learned); q2_0, q4_0, q8_0: llama.cpp's Q2_0 (2 bits, "
        "groups of 64), Q4_0 (4 bits, 32), Q8_0 (8 bits, 32): the zero point fixed at the format's offset and each "
        "group's scale sign chosen at the start, so the run trains into that type and the GGUF export holds it "
        "without loss (--export-format gguf)"))  # asym (learned zero points) or a key of GRIDS (d signed)

    def __post_init__(self):
        if self.init not in INITS:
            raise QuantConfigError(f"`init` {self.init} is not known; use one of {', '.join(INITS)}.")
        if self.grid != "asym" and self.grid not in GRIDS:
            raise QuantConfigError(f"`grid` {self.grid} is not known; use asym or one of {', '.join(GRIDS)}.")
        fixed = GRIDS.get(self.grid)
        if fixed is not None and (self.bits, self.group_size) != (fixed.bits, fixed.group):
            raise QuantConfigError(f"`grid` {self.grid} is llama.cpp's {fixed.gguf_type}: {fixed.bits}-bit codes in "
                                   f"groups of {fixed.group}; use `wbits` {fixed.bits} `group_size` {fixed.group}.")
        if fixed is not None and self.init == "gptq":
            raise QuantConfigError(f"`init` gptq chooses its own zero points; `grid` {self.grid} fixes them: use "
                                   "`init` clip or minmax.")
        if self.bits not in SUPPORTED_BITS:
            raise QuantConfigError(
                f"`wbits` {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}."
            )
        if self.group_size != -1 and (self.group_size < 2 or self.group_size % 2):
            raise QuantConfigError(
                f"`group_size` {self.group_size} is not supported; use -1 (per channel) or an even size "
                "such as 32, 64 or 128."
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def format_grid(self) -> FormatGrid | None:
        return GRIDS.get(self.grid)

    @property
    def fixed_zero(self) -> int | None:
        """The zero point a format grid fixes (None: learned)."""
        return None if self.format_grid is None else self.format_grid.zero

    def groups_in(self, in_features: int) -> int:
        """Number of groups along the input dimension of a [out, in] weight."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        """Fail early, naming the layer, if the layer cannot be grouped or packed."""
        if self.group_size != -1 and in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            hint = f"use `group_size` {' or '.join(map(str, divisors))}" if divisors else "use `group_size` -1"
            raise QuantConfigError(
                f"`group_size` {self.group_size} does not divide the input width {in_features} of layer "
                f"'{name}'; {hint}."
            )
        # GPTQ packing: 32 values fill `bits` int32 words, along inputs (qweight) and outputs (qzeros).
        for what, width in (("input", in_features), ("output", out_features)):
            if (width * self.bits) % 32:
                raise QuantConfigError(
                    f"the {what} width {width} of layer '{name}' cannot be packed at {self.bits} bits "
                    f"(GPTQ packing needs width*bits divisible by 32)."
                )

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost in bits per weight: N + (N + 16) / g (fp16 scale + N-bit zero point per group);
        N + 16 / g on a format grid, which stores no zero point."""
        zero_bits = 0 if self.format_grid is not None else self.bits
        return self.bits + (zero_bits + 16) / self.effective_group(in_features)

    def tag(self) -> str:
        return f"w{self.bits}g{self.group_size}" + ("" if self.format_grid is None else f"-{self.grid}")
