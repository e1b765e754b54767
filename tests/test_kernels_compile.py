"""Every Triton kernel compiles to GPU machine code (cubin) for Hopper (sm_90) and Ampere (sm_80) here,
on a machine without a GPU: Triton's compiler and its bundled ptxas need no device.

The interpreter (TRITON_INTERPRET=1, how tests/test_kernels.py runs the kernels) skips the compiler's
rules, so a kernel can pass every numeric test and still fail its first launch on a GPU: the first
H200 run failed so, on a module-level float read inside a kernel (compiled kernels may only read
constexpr globals). This compiles each kernel with the constexpr values and argument types its
launcher uses, in a child process: the tests' own process has the kernels built for the interpreter.

    python tests/test_kernels_compile.py 90     # the same check by hand
"""
import os
import subprocess
import sys

import pytest


def compile_for(kernel, arch: int, types: dict, constexprs: dict) -> None:
    """Compile `kernel` for sm_<arch> with argument types by name (the rest are the constexprs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    assert set(types) | set(constexprs) == set(names), set(names) ^ (set(types) | set(constexprs))
    signature = {n: types.get(n, "constexpr") for n in names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"], f"{kernel.__name__}: no machine code"


def compile_every_kernel(arch: int) -> int:
    from eqat_dist.kernels import fake_quant, packed_linear

    count = 0
    for weight in ("fp32", "bf16"):  # Block-AP trains float32 weights; bf16 checkpoints too
        ints = dict.fromkeys(["rows", "cols", "groups", "group"], "i32")
        for group in (64, 8192):  # whole groups in a tile (g64), and a per-channel row walked in steps
            block_r, per_tile, block_g = fake_quant._tiles(group)
            tiles = {"BLOCK_R": block_r, "GROUPS": per_tile, "BLOCK_G": block_g}
            compile_for(fake_quant._fq_fwd, arch, {"w_ptr": f"*{weight}", "s_ptr": "*fp32", "z_ptr": "*fp32",
                                                   "out_ptr": f"*{weight}", "qmax": "fp32", **ints}, tiles)
            compile_for(fake_quant._fq_bwd, arch, {"w_ptr": f"*{weight}", "s_ptr": "*fp32", "z_ptr": "*fp32",
                                                   "g_ptr": f"*{weight}", "dw_ptr": f"*{weight}", "ds_ptr": "*fp32",
                                                   "dz_ptr": "*fp32", "qmax": "fp32", **ints}, tiles)
            count += 2
    packed = {"qw_ptr": "*i32", "qz_ptr": "*i32"}
    ints = dict.fromkeys(["M", "N", "K", "group"], "i32")
    sizes = dict.fromkeys(["N", "K", "group"], "i32")  # the dequantization has no rows of activations
    for bits in (2, 3, 4, 8):
        for act in ("bf16", "fp16", "fp32"):
            tiles = {"bits": bits, "BLOCK_M": 16 if act != "fp32" else 64, "BLOCK_N": 64, "BLOCK_K": 32,
                     "PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_F32": False}
            for has_bias in (False, True):
                compile_for(packed_linear._forward, arch, {"x_ptr": f"*{act}", "s_ptr": f"*{act}", "b_ptr": f"*{act}",
                                                           "y_ptr": f"*{act}", **packed, **ints},
                            {**tiles, "HAS_BIAS": has_bias})
            compile_for(packed_linear._grad_input, arch,
                        {"dy_ptr": f"*{act}", "s_ptr": f"*{act}", "dx_ptr": f"*{act}", **packed, **ints}, tiles)
            compile_for(packed_linear._grad_scales, arch,
                        {"x_ptr": f"*{act}", "dy_ptr": f"*{act}", "ds_ptr": "*fp32", **packed, **ints}, tiles)
            compile_for(packed_linear._dequantize, arch,
                        {"s_ptr": f"*{act}", "out_ptr": f"*{act}", **packed, **sizes},
                        {"bits": bits, "SCALED": True, "BLOCK_K": 64, "BLOCK_N": 64})
            count += 5
        compile_for(packed_linear._dequantize, arch, {"s_ptr": "*fp32", "out_ptr": "*fp32", **packed, **sizes},
                    {"bits": bits, "SCALED": False, "BLOCK_K": 64, "BLOCK_N": 64})  # codes for the scales' gradient
        count += 1
    return count


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
def test_every_kernel_compiles_to_machine_code(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 72 kernels" in done.stdout, done.stdout


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    print(f"compiled {compile_every_kernel(int(sys.argv[1]))} kernels for sm_{sys.argv[1]}")
