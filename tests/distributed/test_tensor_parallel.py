"""Tensor parallelism of the attention / DeltaNet heads (parallel/tensor.py) equals the whole model.

- Model level, 2 gloo ranks: the sharded model's loss is the whole model's, and every gradient
  matches it: a shard's gradient is the whole gradient's slice (`tp_shard` says which), replicated
  parameters' gradients are the whole ones. With split KV heads and with a KV head replicated over
  the two ranks (tp > num_key_value_heads). The LM head is split over the toy vocabulary of 97
  (48 and 49 rows): its loss, gradient and gathered logits are the whole head's.
- Trainer level, 4 processes: tp2 x dp2, tp4 with each of 2 KV heads kept by a pair of ranks, and
  tp2 x dp2 with AutoEP's ep2 folded onto the tensor pairs give the 1-process losses, gradient
  norms (DeepSpeed's norm counts sharded, replicated and expert parameters right) and, with the
  checkpoint's head shards and expert files joined, weights over 3 steps.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed.gloo import run_on_ranks
from tests.distributed.test_training import (
    REPO,
    command,
    environment,
    losses,
    overrides,
    pretrain,
    read_metrics,
    saved_weights,
    write_corpus,
)


def sharded_against_whole(rank, world, kv_heads, share=False, mtp_weight=1.0):
    """`share`: the sharded model's heads sum their weight gradient in one buffer (the training step's
    `head_loss_weights`), the whole model's each keep their own. `mtp_weight` weighs the MTP loss
    (0: the MTP head takes no part in the sum)."""
    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM
    from parallel.tensor import TensorParallelGroups, apply_tensor_parallel
    from train.losses import count_targets

    config = tiny_config(num_key_value_heads=kv_heads)
    whole, sharded = Qwen3NextForCausalLM(config), Qwen3NextForCausalLM(config)
    init_weights(whole, config, seed=0)
    init_weights(sharded, config, seed=0)
    apply_tensor_parallel(sharded, TensorParallelGroups(world))
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)  # packed documents
    lm_tokens, mtp_tokens = count_targets(ids, position_ids, 1).tolist()
    sharing = {"head_loss_weights": (1.0, mtp_weight * lm_tokens / mtp_tokens)} if share else {}
    results = []
    for model, options in ((whole, {}), (sharded, sharing)):
        out = model(ids, position_ids=position_ids, labels=ids, **options)
        loss = out.lm_loss_sum / out.lm_tokens + mtp_weight * out.mtp_loss_sums[0] / out.mtp_tokens[0]
        loss.backward()
        results.append(loss.item())
    whole_grads = dict(whole.named_parameters())
    errors, sharded_count = {}, 0
    for name, param in sharded.named_parameters():
        expected = whole_grads[name].grad
        if hasattr(param, "tp_shard"):
            dim, index = param.tp_shard
            expected = expected.index_select(dim, index)
            sharded_count += 1
        assert param.grad.shape == expected.shape, name
        errors[name] = ((param.grad - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    with torch.no_grad():  # the vocabulary-parallel head gathers whole logits
        logits = [model(ids, position_ids=position_ids).logits for model in (whole, sharded)]
    logits_error = ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item()
    return results, errors, sharded_count, logits_error


@pytest.mark.parametrize(
    "kv_heads, share, mtp_weight",
    [(2, False, 1.0), (1, False, 1.0), (2, True, 1.0), (2, True, 0.0)],
    ids=["kv-split", "kv-replicated", "heads-share", "heads-share-mtp-off"],
)
def test_sharded_model_computes_the_whole_models_loss_and_gradients(tmp_path, kv_heads, share, mtp_weight):
    for (whole_loss, sharded_loss), errors, sharded_count, logits_error in run_on_ranks(
        sharded_against_whole, 2, tmp_path, kv_heads, share, mtp_weight
    ):
        assert sharded_loss == pytest.approx(whole_loss, rel=1e-6)
        assert sharded_count > 20, "every mixer's projections, conv, A_log and dt_bias are sharded"
        assert "lm_head.weight" in errors and logits_error < 1e-6
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, f"{worst}: relative gradient error {errors[worst]:.2e}"


COMMON = {"trainer.max_steps": 3, "optim.schedule_steps": 3, "optim.eps": 1.0, "optim.lr": 0.3}


@pytest.fixture(scope="module")
def shared_single(tmp_path_factory) -> tuple[Path, Path]:
    """The corpus and the 1-process reference run of the layouts that change nothing else."""
    root = tmp_path_factory.mktemp("single")
    corpus = write_corpus(root / "corpus")
    pretrain(1, overrides(corpus, root / "single", **COMMON))
    return corpus, root / "single"


def train_single_and_tensor_parallel(tmp_path, corpus, tp: int, parallel_only=None, single=None, **extra):
    """3 steps on 1 process (or `single`, a run of these settings) and on 4 with parallel.tensor=tp;
    asserts equal losses, gradient norms and (the TP ranks' shards joined) weights. Large steps
    (lr 0.3, eps 1) so a wrong gradient or norm shows; clipping (at 1.0) acts on these norms, so a
    miscounted norm changes the weights."""
    common = {**COMMON, **extra}
    parallel = tmp_path / f"tp{tp}"
    if single is None:
        single = tmp_path / "single"
        pretrain(1, overrides(corpus, single, **common))
    pretrain(
        4,
        overrides(corpus, parallel, **common, **{"parallel.tensor": tp, **(parallel_only or {})}),
        timeout=300,
    )
    np.testing.assert_allclose(losses(parallel), losses(single), rtol=1e-5)
    norms = [[row["grad_norm"] for row in read_metrics(run)] for run in (parallel, single)]
    np.testing.assert_allclose(*norms, rtol=1e-5)
    # the weights after 3 steps, the two TP ranks' shards joined back (parallel/checkpoint_files.py)
    expected = saved_weights(single / "checkpoints" / "step_3")
    joined = saved_weights(parallel / "checkpoints" / "step_3")
    assert joined.keys() == expected.keys()
    for name, value in expected.items():
        message = lambda m, n=name: f"{n}: {m}"
        torch.testing.assert_close(joined[name], value, rtol=1e-5, atol=1e-5, msg=message)
    return common, parallel


def test_tp2_dp2_trains_like_one_process(tmp_path, shared_single):
    corpus, single = shared_single
    common, parallel = train_single_and_tensor_parallel(tmp_path, corpus, 2, single=single)

    # resuming on another tensor-parallel size is refused, naming the setting
    result = subprocess.run(
        command(2, overrides(corpus, parallel, **{**common, "trainer.max_steps": 4})),
        cwd=REPO, env=environment(), capture_output=True, text=True,
    )  # fmt: skip
    output = result.stderr + result.stdout
    assert result.returncode != 0 and "parallel.tensor=2" in output
    assert "ValueError" not in output, "said in one message, not in a traceback"


def test_tp4_with_kv_heads_kept_by_rank_pairs_trains_like_one_process(tmp_path):
    """2 KV heads over 4 TP ranks: ranks {0, 1} keep one, {2, 3} the other. Each head's gradient is
    summed over its pair, and DeepSpeed's gradient norm must count each head once."""
    corpus = write_corpus(tmp_path / "corpus")
    heads = {"model.linear_num_key_heads": 4, "model.linear_num_value_heads": 8}
    train_single_and_tensor_parallel(tmp_path, corpus, 4, **heads)


def test_tp2_dp2_with_ep2_trains_like_one_process(tmp_path, shared_single):
    """AutoEP folded onto the tensor-parallel pairs: ranks {0, 1} and {2, 3} each hold the 8 experts
    split in two, and each TP peer dispatches half of their shared tokens' (token, slot) pairs."""
    corpus, single = shared_single
    common, parallel = train_single_and_tensor_parallel(tmp_path, corpus, 2, {"parallel.expert": 2}, single)
    assert any(parallel.joinpath("checkpoints", "step_3").glob("layer_*_expert_*_model_states.pt"))

    # resharding a tensor-parallel run (here to ep4) is refused, saying what to do
    resume = {**common, "trainer.max_steps": 4, "parallel.tensor": 2, "parallel.expert": 4}
    result = subprocess.run(
        command(4, overrides(corpus, parallel, **resume)),
        cwd=REPO, env=environment(), capture_output=True, text=True,
    )  # fmt: skip
    assert (
        result.returncode != 0 and "resume with the layout it was saved with" in result.stderr + result.stdout
    )


def test_joining_shards_keeps_a_whole_saved_lm_head_whole(tmp_path):
    """A checkpoint from before the head was split over the vocabulary holds it whole on every
    tensor rank: the join takes it as it is, the split tensors as before."""
    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM
    from parallel.checkpoint_files import consolidated_module_state
    from parallel.tensor import TensorParallelPosition, apply_tensor_parallel

    config = tiny_config()
    whole = Qwen3NextForCausalLM(config)
    init_weights(whole, config, seed=0)
    for rank in range(2):
        sharded = Qwen3NextForCausalLM(config)
        sharded.load_state_dict(whole.state_dict())
        apply_tensor_parallel(sharded, TensorParallelPosition(2, rank))
        state = sharded.state_dict()
        state["lm_head.weight"] = whole.lm_head.weight.detach().clone()  # saved whole
        torch.save({"module": state}, tmp_path / f"mp_rank_{rank:02d}_model_states.pt")
    joined = consolidated_module_state(tmp_path, config)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(joined[name], value, rtol=0, atol=0, msg=name)
