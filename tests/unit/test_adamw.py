"""The one-pass AdamW's torch reference (model/ops/adamw.py, the CPU path and the GPU kernel's oracle)
against torch's own AdamW on CPU: plain, clipped (grad_scale) and skipped (found_inf) steps."""

import torch

from model.ops.adamw import adamw_flat_

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def test_the_reference_steps_as_torchs_adamw_and_a_skipped_step_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(5000, generator=gen) * 0.1
    mine = {"param": param.clone(), "exp_avg": torch.zeros(5000), "exp_avg_sq": torch.zeros(5000)}
    step, bf16 = torch.zeros(()), torch.empty(5000, dtype=torch.bfloat16)
    theirs = torch.nn.Parameter(param.clone())
    adamw = torch.optim.AdamW([theirs], foreach=False, **HYPER)  # the plain per-tensor algorithm
    steps_taken = 0
    for index, (scale, skipped) in enumerate([(1.0, False), (3.0, False), (1.0, True), (1.0, False)]):
        grad = torch.randn(5000, generator=gen) * 1e-3
        before = {key: value.clone() for key, value in mine.items()}
        adamw_flat_(
            mine["param"], grad, mine["exp_avg"], mine["exp_avg_sq"], step, bf16,
            grad_scale=torch.tensor(scale), found_inf=torch.tensor(float(skipped)), **HYPER,
        )  # fmt: skip
        if skipped:
            assert all(torch.equal(mine[key], before[key]) for key in mine)
            continue
        theirs.grad = grad / scale
        adamw.step()
        steps_taken += 1
        state = adamw.state[theirs]
        assert float(step) == float(state["step"]) == steps_taken  # the skipped step not counted
        assert torch.equal(bf16, mine["param"].bfloat16())
        for key, want in (
            ("param", theirs.detach()),
            ("exp_avg", state["exp_avg"]),
            ("exp_avg_sq", state["exp_avg_sq"]),
        ):
            assert (mine[key] - want).abs().max() <= 1e-6 * want.abs().max(), (index, key)
