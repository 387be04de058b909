"""The Triton kernels of model/ops compile for Hopper (sm_90) on a machine without a GPU: Triton's own
compiler, down to the cubin through its bundled ptxas, at the argument types the wrappers launch
them with. tests/unit/test_triton_interpreted.py checks what the kernels compute on the CPU; this
checks that the GPU compiler accepts them, which the interpreter does not (it runs any Python the
kernel's operations allow), before a GPU machine is needed to find out."""

import pytest

triton = pytest.importorskip("triton")

import model.ops.adamw as adamw  # noqa: E402
import model.ops.casting as casting  # noqa: E402
import model.ops.cross_entropy as cross_entropy  # noqa: E402
from model.ops.triton_support import LAUNCH_OPTIONS  # noqa: E402

pytestmark = pytest.mark.skipif(
    "nvidia" not in triton.backends.backends, reason="Triton without its CUDA backend"
)


def compile_for_hopper(kernel, signature: dict[str, str], constexprs: dict, num_warps: int, options=None):
    """The cubin of `kernel` for sm_90, compiled with the options its wrapper launches it with (or
    `options`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = LAUNCH_OPTIONS if options is None else options
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **options}
    )


def _cases():
    adamw_kernel, _ = adamw._kernel()
    add_kernel, scale_kernel, _ = casting._kernels()
    fp32_buffers = dict.fromkeys(("param_ptr", "grad_ptr", "exp_avg_ptr", "exp_avg_sq_ptr"), "*fp32")
    yield "adamw", adamw_kernel, {
        **fp32_buffers, "bf16_ptr": "*bf16", "n": "i64", "hyper_ptr": "*fp64", "found_inf_ptr": "*fp32",
    }, {"BLOCK": adamw.BLOCK}, adamw.NUM_WARPS  # fmt: skip
    for dtype in ("bf16", "fp16"):
        for overwrite in (True, False):
            for squares in (True, False):
                yield f"add_into_fp32-{dtype}-overwrite{overwrite}-squares{squares}", add_kernel, {
                    "dst_ptr": "*fp32", "src_ptr": f"*{dtype}", "squares_ptr": "*fp32", "n": "i32",
                }, {"OVERWRITE": overwrite, "SQUARES": squares, "BLOCK": casting.BLOCK}, 8  # fmt: skip
        yield f"scale_in_place-{dtype}", scale_kernel, {
            "x_ptr": f"*{dtype}", "factor_ptr": "*fp32", "n": "i32",
        }, {"BLOCK": casting.BLOCK}, 8  # fmt: skip
    yield "cross_entropy_in_place", cross_entropy._in_place_kernel(), {
        "logits_ptr": "*bf16", "labels_ptr": "*i64", "keep_ptr": "*i1", "loss_ptr": "*fp32", "vocab": "i32",
    }, {"BLOCK": cross_entropy.IN_PLACE_BLOCK}, 8  # fmt: skip


@pytest.mark.parametrize("case", list(_cases()), ids=lambda case: case[0])
def test_kernel_compiles_to_a_hopper_cubin(case):
    _, kernel, signature, constexprs, num_warps = case
    compiled = compile_for_hopper(kernel, signature, constexprs, num_warps)
    assert len(compiled.asm["cubin"]) > 0
    assert ".target sm_90" in compiled.asm["ptx"]


def test_the_launch_options_keep_fused_multiply_adds_where_triton_would_drop_them(monkeypatch):
    # Triton 3.10's default (TRITON_DEFAULT_FP_FUSION=0 here): without our options AdamW's arithmetic
    # compiles to separately rounded multiplies and adds (`mul.rn`, `add.rn`), rounding twice where
    # the GPU tests measured one fused multiply-add
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    _, kernel, signature, constexprs, num_warps = next(case for case in _cases() if case[0] == "adamw")
    ours = compile_for_hopper(kernel, signature, constexprs, num_warps)
    default = compile_for_hopper(kernel, signature, constexprs, num_warps, options={})
    assert "fma.rn." in ours.asm["ptx"]
    assert "fma.rn." not in default.asm["ptx"]
