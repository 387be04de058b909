"""Checks of model/ops's Triton kernels shared by their GPU tests (tests/gpu, compiled on CUDA) and their
interpreted ones (tests/unit/interpreted_kernels.py, Triton's interpreter on the CPU): the same
inputs and assertions on either device. What differs between the two is passed in: the device, the
sizes, and how the bf16 weights are held to the fp32 ones (bit for bit on the GPU; the interpreter
casts to bf16 by truncation)."""

from collections.abc import Callable

import torch

ADAMW_HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def adamw_state(param: torch.Tensor) -> dict:
    """A parameter's flat fp32 weights, moments, step count and bf16 copy, fresh as torch makes them."""
    return {
        "param": param.clone(),
        "exp_avg": torch.zeros_like(param),
        "exp_avg_sq": torch.zeros_like(param),
        "step": torch.zeros((), device=param.device),
        "bf16": torch.empty_like(param, dtype=torch.bfloat16),
    }


def adamw_step(state: dict, step_fn, grad, grad_scale, found_inf) -> None:
    step_fn(
        state["param"], grad, state["exp_avg"], state["exp_avg_sq"], state["step"], state["bf16"],
        grad_scale=grad_scale, found_inf=found_inf, **ADAMW_HYPER,
    )  # fmt: skip


def normwise_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_adamw_steps(
    kernel_fn,
    reference_fn,
    *,
    device: str,
    n: int,
    steps: list[tuple[float, float]],
    check_bf16: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """`kernel_fn` (model/ops/adamw.py's `adamw_flat_`) against `reference_fn` and torch's fused
    AdamW over `steps` of (grad_scale, found_inf): a skipped step changes no weight, a taken one does;
    the step counts agree; `check_bf16(bf16 copy, fp32 weights)`; weights and moments within an ulp
    of the reference (which rounds where the kernel does) and 1e-6 of torch's."""
    gen = torch.Generator(device=device).manual_seed(0)
    param = torch.randn(n, device=device, generator=gen) * 0.05
    kernel, reference = adamw_state(param), adamw_state(param)
    torch_param = torch.nn.Parameter(param.clone())
    torch_adamw = torch.optim.AdamW([torch_param], fused=True, **ADAMW_HYPER)
    for index, (scale, inf) in enumerate(steps):
        grad = torch.randn(n, device=device, generator=gen) * 1e-3 * (index + 1)
        grad_scale = torch.tensor(scale, device=device)
        found_inf = torch.tensor(inf, device=device)
        before = kernel["param"].clone()
        adamw_step(kernel, kernel_fn, grad, grad_scale, found_inf)
        adamw_step(reference, reference_fn, grad, grad_scale, found_inf)
        torch_param.grad = grad.clone()
        torch_adamw.grad_scale, torch_adamw.found_inf = grad_scale, found_inf
        torch_adamw.step()
        torch_state = torch_adamw.state[torch_param]
        if inf:
            assert torch.equal(kernel["param"], before)
        else:
            assert not torch.equal(kernel["param"], before)
        assert float(kernel["step"]) == float(torch_state["step"]) == float(reference["step"])
        check_bf16(kernel["bf16"], kernel["param"])
        for key, theirs in (("param", torch_param.detach()), ("exp_avg", None), ("exp_avg_sq", None)):
            theirs = torch_state[key] if theirs is None else theirs
            # against the reference, which rounds where the kernel does: an ulp at most
            assert normwise_error(kernel[key], reference[key]) < 2e-7, (index, key)
            assert normwise_error(kernel[key], theirs) < 1e-6, (index, key)


def cross_entropy_chunk(rows: int, vocab: int, *, device: str, seed: int, drop: float):
    """A chunk's bf16 logits, labels and keep mask, as `loss_and_grad_logits_in_place` takes them: a
    row of equal logits (row 3), labels at both ends of the vocabulary (rows 0-2), about `drop` of
    the rows ignored (rows 0-3 kept), ignored rows' labels replaced by 0 as `_safe_labels` does."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits_cv = (torch.randn(rows, vocab, device=device, generator=gen) * 4).bfloat16()
    logits_cv[3] = 0.5
    labels_c = torch.randint(vocab, (rows,), device=device, generator=gen)
    labels_c[:3] = torch.tensor([0, vocab - 1, vocab - 1])
    keep_c = torch.rand(rows, device=device, generator=gen) > drop
    keep_c[:4] = True
    return logits_cv, torch.where(keep_c, labels_c, 0), keep_c
