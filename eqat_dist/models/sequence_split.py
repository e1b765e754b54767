"""One block's tokens split over S ranks (sequence parallelism), for Block-AP: a decoder block treats
tokens one by one except in attention, so each rank runs the block on its share of every window's
tokens and attention alone looks across the shares: the keys and values of the whole window are
gathered over the S ranks (their gradients sent back to their owners in the backward) and each rank's
queries attend to them by global position, causally and within a sliding window where the layer has
one. The arithmetic is the unsplit block's, up to float summation order.

A window of T tokens is cut into 2S chunks and rank s holds chunks s and 2S-1-s (a zig-zag): under a
causal mask every rank then has the same attention work. The rotary tables and position ids of the
block's recorded call (models/blocks.BlockCall) are cut to the rank's positions.

HF's attention modules call the function their config names (`_attn_implementation`); a block run
split has its attention modules name `eqat_split` (registered here), which falls back to HF's sdpa for
a call without a split.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache, cached_property

import torch
from torch import nn

from .blocks import BlockCall

SPLIT_ATTENTION = "eqat_split"
SPLIT_KWARG = "eqat_split"  # the keyword a split call carries down to the attention function


class SplitError(ValueError):
    """A layout that cannot split a window (the message names the settings and the fix)."""


def check_split(tokens: int, parts: int) -> None:
    if parts < 1:
        raise SplitError("`sequence_parallel` must be >= 1")
    if parts > 1 and tokens % (2 * parts):
        raise SplitError(f"`seqlen` {tokens} does not cut into 2 x `sequence_parallel` {parts} = {2 * parts} equal "
                         f"chunks (two per rank, for the causal mask's balance): use a `seqlen` that is a multiple "
                         f"of {2 * parts}")


def zigzag_positions(tokens: int, parts: int, part: int) -> torch.Tensor:
    """The global positions rank `part` of `parts` holds: chunks `part` and 2*parts-1-part of 2*parts."""
    check_split(tokens, parts)
    if parts == 1:
        return torch.arange(tokens)
    chunk = tokens // (2 * parts)
    first, second = part * chunk, (2 * parts - 1 - part) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


@dataclass(frozen=True)
class TokenSplit:
    """This rank's share of every window's tokens, and the group of the S ranks that share a window."""
    tokens: int  # T: a window's length
    parts: int = 1  # S
    part: int = 0  # this rank's place among the S
    group: object = None  # a SumGroup of the S ranks (cluster/transport.py); None when parts == 1

    @cached_property
    def positions(self) -> torch.Tensor:
        return zigzag_positions(self.tokens, self.parts, self.part)

    @cached_property
    def all_positions(self) -> torch.Tensor:
        """Every rank's positions, in rank order: the order of the gathered keys and values."""
        return torch.cat([zigzag_positions(self.tokens, self.parts, p) for p in range(self.parts)])

    def mask(self, device, sliding_window: int | None = None) -> torch.Tensor:
        """[this rank's tokens, the window's] True where a query may see a key: causal by global position,
        within `sliding_window` (HF's: a key is seen while q - k < window). Made once per device and window."""
        key = (str(device), sliding_window)
        masks = self.__dict__.setdefault("_masks", {})
        if key not in masks:
            q, k = self.positions.to(device), self.all_positions.to(device)
            allowed = k[None, :] <= q[:, None]
            if sliding_window:
                allowed &= k[None, :] > q[:, None] - sliding_window
            masks[key] = allowed
        return masks[key]

    @property
    def local_tokens(self) -> int:
        return self.tokens // self.parts

    @property
    def splits(self) -> bool:
        return self.parts > 1

    def cut(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of `x` (whole windows along `dim`)."""
        if not self.splits:
            return x
        return x.index_select(dim, self.positions.to(x.device))

    def call(self, call: BlockCall) -> BlockCall:
        """The block's recorded call (one whole window) for this rank's tokens: the rotary tables and
        position ids at its positions, no mask (the split attention makes its own), and the split."""
        if not self.splits:
            return call
        kwargs = dict(call.kwargs)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (self.cut(cos), self.cut(sin))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.cut(kwargs["position_ids"])
        kwargs["attention_mask"] = None
        kwargs[SPLIT_KWARG] = self
        return BlockCall(call.args, kwargs)


class _GatherTokens(torch.autograd.Function):
    """[..., t, d] on each of S ranks -> [..., S*t, d] (rank order) on all (tokens on the second-last
    dimension); the backward sums the gathered gradient over the ranks and keeps each rank's own slice
    (the gradient of its keys from every rank's queries)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, split: TokenSplit) -> torch.Tensor:
        ctx.split = split
        laid_out = local.new_zeros(split.parts, *local.shape)
        laid_out[split.part] = local
        split.group.allreduce_sum_(laid_out)
        return torch.cat(laid_out.unbind(0), dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        split = ctx.split
        summed = grad.float().contiguous()  # the S partial gradients summed in float32, as one matmul would
        split.group.allreduce_sum_(summed)
        return summed.chunk(split.parts, dim=-2)[split.part].to(grad.dtype).contiguous(), None


def gather_tokens(local: torch.Tensor, split: TokenSplit) -> torch.Tensor:
    return _GatherTokens.apply(local, split)


def split_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                    sliding_window=None, softcap=None, **kwargs):
    """HF's attention-function signature: this rank's queries against the whole window's keys and
    values ([B, heads, tokens, head_dim]; keys and values after the rotary, before grouped-query
    repetition), masked by global position; the output as HF's sdpa returns it ([B, tokens, heads, d])."""
    split: TokenSplit | None = kwargs.pop(SPLIT_KWARG, None)
    if split is None or not split.splits:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    key, value = gather_tokens(torch.stack([key, value]), split).unbind(0)  # one exchange for both
    allowed = split.mask(query.device, sliding_window)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    repeat = getattr(module, "num_key_value_groups", 1)
    if softcap is None:  # grouped-query attention in the kernel: no repeated copy of the keys and values
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout,
                                                         scale=scale, enable_gqa=repeat > 1)
    else:  # Gemma 2's soft cap on the attention logits: the eager way, as HF does
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        weights = torch.matmul(query, key.transpose(2, 3)) * scale
        weights = torch.tanh(weights / softcap) * softcap
        weights = weights.masked_fill(~allowed, float("-inf"))
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights, value)
    return out.transpose(1, 2).contiguous(), None


@cache
def _register() -> None:
    """Make SPLIT_ATTENTION a name HF attention modules look up; done on first use, not at import, so
    that a command that loads no model (`--help`, `plan`, a refusal) does not import transformers."""
    from transformers import AttentionInterface
    AttentionInterface.register(SPLIT_ATTENTION, split_attention)


def attention_modules(block: nn.Module) -> list[nn.Module]:
    """The block's attention modules: those HF gives an attention function by their config."""
    return [m for m in block.modules() if hasattr(m, "config") and hasattr(m, "num_key_value_groups")]


def use_split_attention(block: nn.Module) -> nn.Module:
    """`block` (in place) with its attention modules calling split_attention: each gets a copy of the
    config that names it (the model's own config, which the export writes, is untouched)."""
    _register()
    for module in attention_modules(block):
        if module.config._attn_implementation != SPLIT_ATTENTION:
            module.config = copy.copy(module.config)
            module.config._attn_implementation = SPLIT_ATTENTION
    return block


def check_family(config: dict) -> None:
    """Refuse, in one line, a model (its config.json) whose attention the split does not reproduce."""
    from .family import SUPPORTED_FAMILIES
    kind = config.get("model_type", "?")
    if kind not in SUPPORTED_FAMILIES:
        raise SplitError(f"`sequence_parallel` splits the attention of {', '.join(SUPPORTED_FAMILIES)} models; "
                         f"{kind} is not one of them: use `sequence_parallel` 1")
