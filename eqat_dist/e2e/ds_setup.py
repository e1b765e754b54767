"""Everything DeepSpeed-specific of E2E-QP: the config, the model built under zero.Init (so the
whole model never lands on one device), loading weights into partitioned parameters, the engine and
its checkpoints (saving, loading, converting between numbers of ranks), and gathering parameters
back, one block at a time, for the export. No other module imports deepspeed."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import torch._dynamo  # noqa: F401  must be imported before zero.Init patches tensor creation
import transformers.generation.continuous_batching  # noqa: F401  (imports dynamo-dependent code early)

from ..models.family import is_output_head, missing_is_tied_head, ties_head
from .ds_config import accumulation_steps, read_ds_config

# DeepSpeed 0.19 calls torch.distributed's deprecated all_gather_into_tensor / reduce_scatter_tensor on
# every ZeRO-3 step: two FutureWarnings per step would bury the step lines of a run's log.
for _name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
    warnings.filterwarnings("ignore", message=rf".*torch\.distributed\.{_name}` is deprecated", category=FutureWarning)
# DeepSpeed's barriers on NCCL: "barrier(): using the device under current context" (twice a run on the
# H200). The current device is this rank's own (cluster/launch.bind_device), which is what it warns about.
warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context", category=UserWarning)


def init_distributed() -> None:
    """The default process group (DeepSpeed's), from the RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT that cluster/launch.py exported at start-up (all five: DeepSpeed then skips its own
    discovery, which would dial loopback under MPI)."""
    import deepspeed

    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: the launch environment was not settled (cluster/launch.py)")
    from ..cluster.transport import backends
    deepspeed.init_distributed(dist_backend=backends(torch.cuda.is_available())[0])


def load_ds_config(name_or_path: str, micro_batch: int, global_batch: int, world: int, max_grad_norm: float,
                   bf16: bool) -> tuple[dict, int]:
    """The DeepSpeed config with batch sizes filled in so that the global batch is what the user asked
    for whatever the number of ranks; returns (config, gradient accumulation steps)."""
    config = read_ds_config(name_or_path)
    accum = accumulation_steps(global_batch, micro_batch, world)
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accum,
                  train_batch_size=global_batch, gradient_clipping=max_grad_norm)
    config["bf16"] = {"enabled": bool(bf16)}
    return config, accum


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def _is_rank0() -> bool:
    """Rank 0 of the process group (one process when none is formed)."""
    import torch.distributed as torch_dist
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def build_packed_model(folder: Path, ds_config: dict, dtype: torch.dtype):
    """The packed model of `folder` (a GPTQ-v2 export) with every parameter created partitioned under
    zero.Init (ZeRO-3) and its weights loaded rank 0 -> partitions, one module at a time."""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..export import read_quant_config
    from ..models.blocks import decoder_layers
    from ..models.quantize import packed_skeleton
    from ..quant.packed_linear import PackedLinear
    from ..utils.tensors import LazyTensors

    config = AutoConfig.from_pretrained(folder)
    cfg = read_quant_config(folder, config)
    del config.quantization_config
    zero3 = zero_stage(ds_config) == 3
    if zero3 and (dtype == torch.bfloat16) != bool(ds_config.get("bf16", {}).get("enabled")):
        raise ValueError(f"model dtype {dtype} disagrees with the DeepSpeed config's bf16 setting")
    # dtype comes from the config's bf16/fp16 flags: zero.Init(dtype=torch.float32) is silently turned into
    # bfloat16 on accelerators without fp16 support (DeepSpeed 0.19 operator-precedence bug), and
    # CPU bf16 matmuls are ~50x slower than float32 ones.
    context = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else torch.device("cpu")
    from transformers.initialization import no_init_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # The model's classes are defined (its module imported) before zero.Init: a class created inside it
    # gets back, at its exit, the __init__ it had before its decorators ran (transformers' `kernels`
    # hooks set per-instance state there), and every later instance of it fails in its forward.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    with context, no_init_weights():  # every weight is loaded below; init would touch empty partitions
        with linears_built_packed(cfg, dtype, config):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for block in decoder_layers(model):
            packed_skeleton(block, cfg, dtype)  # any block linear the stand-in did not reach
    blocks = block_prefixes(model)
    stray = [n for n, m in model.named_modules()
             if isinstance(m, PackedLinear) and not any(n.startswith(b + ".") for b in blocks)]
    if stray:  # only the output head is expected outside the blocks; this one has other linears
        raise RuntimeError(f"{folder}: linear layers outside the decoder blocks ({', '.join(stray[:3])}) are not "
                           "supported by the E2E-QP model build")
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"the packed model was built in {', '.join(sorted(wrong))} instead of {dtype}")
    if ties_head(config):
        model.tie_weights()  # lm_head shares the embedding (its own tensor is not in the checkpoint)
    state = LazyTensors(folder) if _is_rank0() or not zero3 else {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=zero3):
            if state:
                for pname, p in params.items():
                    key = f"{name}.{pname}" if name else pname
                    if key in state:
                        p.data.copy_(state[key].to(p.dtype))
                    elif not missing_is_tied_head(key, config):
                        raise KeyError(f"{folder} has no tensor {key}")
    return model, cfg


@contextmanager
def linears_built_packed(cfg, dtype: torch.dtype, config):
    """While the model is constructed, `nn.Linear(...)` makes an empty PackedLinear instead, except for
    the output head (models/family.is_output_head), which stays a float layer. Otherwise every float
    linear of the model is allocated (and, under zero.Init, partitioned) only to be replaced: at 70B
    that is 137 GB in bf16, on one GPU more than it has, split over N GPUs a 1/N spike at start."""
    from ..quant.packed_linear import PackedLinear

    real = torch.nn.Linear

    class PackedUnlessHead:  # stands in for the class; nothing is ever an instance of it
        def __new__(cls, in_features, out_features, bias=True, device=None, dtype=None):
            if is_output_head(out_features, config):
                return real(in_features, out_features, bias=bias, device=device, dtype=dtype)
            return PackedLinear(in_features, out_features, cfg, bias=bias, dtype=layer_dtype, device=device)

    layer_dtype = dtype
    torch.nn.Linear = PackedUnlessHead
    try:
        yield
    finally:
        torch.nn.Linear = real


def block_prefixes(model) -> list[str]:
    """The module names of the decoder blocks."""
    from ..models.blocks import decoder_layers

    blocks = {id(b) for b in decoder_layers(model)}
    return [n for n, m in model.named_modules() if id(m) in blocks]


def make_engine(model, optimizer, schedule, ds_config: dict):
    """The DeepSpeed engine around `model`; returns (engine, its optimizer, its scheduler)."""
    import deepspeed

    engine, optimizer, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                          config=ds_config)
    return engine, optimizer, schedule


def save_engine_checkpoint(engine, folder: Path, tag: str, client_state: dict) -> None:
    """Every rank writes its shard; returns after DeepSpeed's barrier, once the whole checkpoint is on disk
    and `latest` names it."""
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)


def load_engine_checkpoint(engine, folder: Path, tag: str):
    """(path, client_state) as DeepSpeed returns them; path None when nothing was loaded."""
    return engine.load_checkpoint(str(folder), tag=tag)


def convert_to_universal_format(source: Path, target: Path) -> subprocess.CompletedProcess:
    """DeepSpeed's converter from per-rank ZeRO partitions to one file per parameter, in a child process
    (it runs worker pools)."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(target), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "2"]
    return subprocess.run(cmd, capture_output=True, text=True)


def gathered_blocks(model):
    """Each decoder block's parameters, gathered one block at a time: yields (index, {name in the block:
    CPU copy}) on rank 0 and (index, {}) elsewhere, so no rank ever holds more than one whole block.
    The gathers are collectives: every rank must consume the generator to its end, in step."""
    import deepspeed

    from ..models.blocks import decoder_layers

    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    rank0 = _is_rank0()
    for index, block in enumerate(decoder_layers(model)):
        params = dict(block.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero3):
            yield index, ({k: p.detach().cpu().clone() for k, p in params.items()} if rank0 else {})


def partition_report(model) -> dict:
    """For each integer parameter kind: elements held by this rank vs the whole tensor (proves sharding)."""
    local = full = 0
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            full += getattr(p, "ds_numel", p.numel())
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return {"int_elements_local": local, "int_elements_full": full}
