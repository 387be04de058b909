"""The training loop end to end on CPU: `torchrun launch/pretrain.py` on 1 and 2 gloo processes.

A toy model (tests/conftest.py's sizes, vocabulary 97) trains on a small synthetic corpus whose
documents follow learnable patterns, so each run takes seconds. What is checked:
- rerunning the same config gives bitwise-identical losses;
- a run stopped after N steps and resumed (checkpoint.resume=auto) repeats the losses of steps
  N+1..2N of an uninterrupted run bitwise, and metrics.jsonl holds every step once;
- 2 processes give the losses of 1 process on the same global batch (fp32, 1e-5);
  (these runs use the aux-loss-free expert biases, which must resume and agree across ranks too)
- SIGTERM finishes the step, saves a complete checkpoint and exits 0; during an evaluation it cuts
  the evaluation short on every rank and saves at its step;
- non-finite steps are skipped (no update) and counted, and max_bad_steps in a row stop the run with
  the last checkpoint intact (in-process on 2 gloo ranks, with a forward that returns NaN).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from tests.distributed.gloo import run_on_ranks, torchrun
from tests.unit.test_loader import write_shard

REPO = Path(__file__).resolve().parents[2]
VOCAB, EOS = 97, 96
# tests/conftest.py's toy sizes, given to the preset as overrides
MODEL_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "full_attention_interval", "num_attention_heads",
    "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "shared_expert_intermediate_size", "mtp_num_layers",
)  # fmt: skip
MODEL = {name: getattr(tiny_config(), name) for name in MODEL_FIELDS}
DESIGN_METRICS = {
    "step",
    "loss",
    "lm_loss",
    "mtp_loss",
    "lb_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "tflops_per_gpu",
    "expert_load_max_over_mean",
}


def write_corpus(
    directory: Path, shards: int = 8, documents: int = 12, seed: int = 0, domains: tuple[str, ...] = ()
) -> Path:
    """Documents that count up from a random start with a random stride (mod EOS): learnable. With
    `domains` (one per shard: "up" or "down") the shards are tagged, and "down" counts down."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for number in range(shards):
        docs = []
        sign = -1 if domains and domains[number] == "down" else 1
        for _ in range(documents):
            start, stride, length = rng.integers(0, EOS), rng.integers(1, 4), rng.integers(5, 60)
            tokens = (start + sign * stride * np.arange(length)) % EOS
            docs.append(np.append(tokens, EOS).astype(np.uint32))
        entries.append(write_shard(directory / f"shard-{number:06d}.tar", f"s{number}", docs))
        if domains:
            entries[-1]["domain"] = domains[number]
    index = {"tokenizer": "synthetic", "vocab_size": VOCAB, "eos_id": EOS, "shards": entries}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def eval_corpus(tmp_path_factory) -> Path:
    """Held-out shards of two domains, for the evaluation by domain."""
    return write_corpus(
        tmp_path_factory.mktemp("eval_corpus"), shards=4, seed=1, domains=("up", "up", "down", "down")
    )


def with_evaluation(eval_corpus: Path) -> dict:
    """Held-out metrics after steps 2, 4 and 6 (and the last), two global batches of each domain,
    read in two streams (training reads four)."""
    return {
        "data.eval_path": eval_corpus,
        "data.eval_streams": 2,
        "trainer.eval_every": 2,
        "trainer.eval_batches": 2,
    }


def overrides(corpus: Path, run_dir: Path, **extra) -> list[str]:
    values = {f"model.{k}": v for k, v in MODEL.items()}
    values.update(
        {
            "run.dir": run_dir,
            "data.path": corpus,
            "data.seq_len": 32,
            "data.streams": 4,
            "data.num_workers": 0,
            "trainer.global_batch_size": 8,
            "trainer.micro_batch_size": 2,
            "trainer.max_steps": 6,
            "optim.schedule_steps": 6,
            "optim.warmup_steps": 2,
            "optim.lr": 3e-3,
            "checkpoint.every": 0,
            "loss.expert_bias_rate": 0.01,  # the biases must resume and agree across ranks too
            "logging.wandb.mode": "disabled",
            "logging.plot_every": 1000,
        }
    )
    values.update(extra)
    return ["conf=tiny", *(f"{k}={v}" for k, v in values.items())]


def command(nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "launch/pretrain.py", *args]
    return [*torchrun(nproc), "launch/pretrain.py", *args]


def environment() -> dict[str, str]:
    """This process's environment without a process group's variables: a run started from a test
    sets up its own (an inherited MASTER_PORT would have both test workers' runs bind that port)."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in PROCESS_GROUP_VARIABLES and not k.startswith("TORCHELASTIC_")
    }
    return dict(inherited, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


PROCESS_GROUP_VARIABLES = {
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"
}  # fmt: skip


def pretrain(nproc: int, args: list[str], timeout: float = 240) -> str:
    result = subprocess.run(
        command(nproc, args), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"pretrain failed ({result.returncode}):\n{output[-4000:]}"
    return output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def saved_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights in the single-device model's names and layout (experts fused)."""
    from parallel.checkpoint_files import consolidated_module_state
    from train.checkpoint import model_config_of

    return consolidated_module_state(checkpoint, model_config_of(checkpoint))


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def straight_run(corpus, eval_corpus, tmp_path_factory) -> Path:
    """6 uninterrupted steps on 2 processes, evaluated every 2."""
    run_dir = tmp_path_factory.mktemp("straight")
    pretrain(2, overrides(corpus, run_dir, **with_evaluation(eval_corpus)))
    return run_dir


def test_the_run_directory_holds_config_metrics_and_a_checkpoint(straight_run):
    rows = read_metrics(straight_run)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert row.keys() >= DESIGN_METRICS, DESIGN_METRICS - row.keys()
    assert rows[-1]["tokens"] == 6 * 8 * 32
    assert "vocab_size: 97" in (straight_run / "config.yaml").read_text()
    final = straight_run / "checkpoints" / "step_6"
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 6
    assert not list((straight_run / "checkpoints").glob(".staging/*")), "staging left behind"
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"], "the loss should fall on the patterned corpus"
    module = torch.load(final / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    biases = [v for k, v in module.items() if k.endswith("mlp.expert_bias")]
    assert len(biases) == 5 and all(b.dtype == torch.float32 for b in biases)
    steps = torch.stack(biases) / 0.01  # six updates of -1, 0 or +1 steps each
    assert steps.abs().max() > 0 and steps.abs().max() <= 6
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)


def test_rerun_and_resume_repeat_the_losses_bitwise(corpus, straight_run, tmp_path):
    expected = losses(straight_run)
    run_dir = tmp_path / "resumed"
    pretrain(
        2, overrides(corpus, run_dir, **{"trainer.max_steps": 3, "checkpoint.every": 1, "checkpoint.keep": 2})
    )
    assert losses(run_dir) == expected[:3], "the same config must give the same losses"
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_2", "step_3"], f"checkpoint.keep=2 should keep the last two, found {kept}"

    output = pretrain(2, overrides(corpus, run_dir))
    assert "resuming from" in output and "step_3" in output
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert losses(run_dir) == expected, "steps 4..6 after resuming must equal the uninterrupted run"
    saved_after_resume = run_dir / "checkpoints" / "step_6" / "mp_rank_00_model_states.pt"
    assert zipfile.is_zipfile(saved_after_resume), "saved in torch's zip format (memory-mappable)"


def test_one_process_gives_the_losses_of_two(corpus, eval_corpus, straight_run, tmp_path):
    """The training losses, and the held-out metrics of the same weights (after step 2), which
    read the same eval sequences split over 2 ranks or not."""
    run_dir = tmp_path / "one"
    pretrain(1, overrides(corpus, run_dir, **with_evaluation(eval_corpus), **{"trainer.max_steps": 3}))
    np.testing.assert_allclose(losses(run_dir), losses(straight_run)[:3], rtol=1e-5)
    evaluations = [
        {row["step"]: {k: v for k, v in row.items() if k.startswith("eval_")} for row in read_metrics(run)}
        for run in (run_dir, straight_run)
    ]
    one, two = evaluations
    assert [step for step, values in two.items() if values] == [2, 4, 6]
    assert [step for step, values in one.items() if values] == [2, 3]  # every 2 steps, and the last
    by_domain = {f"eval_{name}/{domain}" for name in ("lm_loss", "routing_kl") for domain in ("up", "down")}
    assert (
        one[2].keys()
        == {"eval_lm_loss", "eval_ppl", "eval_mtp_loss", "eval_mtp_accept", "eval_routing_kl"} | by_domain
    )
    for key, value in one[2].items():
        if "routing" not in key:
            assert two[2][key] == pytest.approx(value, rel=1e-5), key
    assert two[6]["eval_lm_loss"] < two[2]["eval_lm_loss"], "the held-out loss falls on a learnable corpus"
    # the held-out loss is a mean of the domains' (weighted by their targets)
    domain_losses = [one[2]["eval_lm_loss/up"], one[2]["eval_lm_loss/down"]]
    assert min(domain_losses) < one[2]["eval_lm_loss"] < max(domain_losses)

    routing_one, routing_two = (read_jsonl(run / "domain_routing.jsonl") for run in (run_dir, straight_run))
    assert [r["step"] for r in routing_one] == [2, 3] and [r["step"] for r in routing_two] == [2, 4, 6]
    first = routing_one[0]
    assert first["domains"] == ["up", "down"]
    counts = np.array(first["counts"])  # [domain, layer, expert]
    # The weights after step 2 differ in the last float bits between 1 and 2 processes (the losses agree
    # to 1e-5, not bitwise), and a near-tie in a router's top-k can flip with them: the counts agree
    # up to a few flipped (token, slot) pairs, the KL to about as much.
    moved = np.abs(counts - np.array(routing_two[0]["counts"])).sum() / 2
    print(f"routing: {moved:.0f} of {counts.sum()} (token, slot) pairs went elsewhere on 2 processes")
    assert moved <= 0.01 * counts.sum()
    assert two[2]["eval_routing_kl"] == pytest.approx(one[2]["eval_routing_kl"], abs=2e-4)
    assert first["tokens"] == [2 * 8 * 32] * 2  # two global batches of 8 x 32 tokens a domain
    main_layers = [row for row, label in enumerate(first["layers"]) if not label.startswith("MTP")]
    expected = np.array(first["tokens"])[:, None] * MODEL["num_experts_per_tok"]
    np.testing.assert_array_equal(
        counts[:, main_layers].sum(axis=-1), np.broadcast_to(expected, (2, len(main_layers)))
    )
    assert (straight_run / "domain_routing.png").stat().st_size > 0


def test_skipped_shards_are_counted_over_all_ranks(corpus, tmp_path):
    """With data.skip_corrupt, each rank skips the bad shards of its own streams; the logged count
    is the run's, so 2 processes log what 1 process (every stream) logs."""
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    for number in (1, 4, 6):
        (damaged / f"shard-{number:06d}.tar").unlink()
    counts = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"nproc{nproc}"
        extra = {"data.skip_corrupt": "true", "trainer.max_steps": 3, "checkpoint.every": 0}
        pretrain(nproc, overrides(damaged, run_dir, **extra))
        counts[nproc] = [row["data_skipped_shards"] for row in read_metrics(run_dir)]
    assert counts[1][-1] > 0, "the run should have met a missing shard"
    assert counts[2] == counts[1]


def test_sigterm_saves_a_checkpoint_and_exits_zero(corpus, tmp_path):
    run_dir = tmp_path / "preempted"
    args = overrides(corpus, run_dir, **{"trainer.max_steps": 100000, "optim.schedule_steps": 100})
    proc = subprocess.Popen(
        command(1, args),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    last_step = read_metrics(run_dir)[-1]["step"]
    state = json.loads((run_dir / "checkpoints" / f"step_{last_step}" / "trainer_state.json").read_text())
    assert state["step"] == last_step


def train_with_sigterm_in_evaluation(rank, world, corpus: str, eval_corpus: str, run_dir: str, steps: int):
    """Rank 1 gets SIGTERM during its first evaluation's first micro-batch; (the step of each
    evaluation micro-batch the rank ran, its step at the end)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    register_configs()
    extra = {**with_evaluation(Path(eval_corpus)), "trainer.max_steps": steps, "trainer.eval_batches": 3}
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose("pretrain", overrides=overrides(Path(corpus), Path(run_dir), **extra))
    cfg = OmegaConf.to_object(raw)
    trainer = Trainer(cfg, validate_layout(cfg, world))
    forward = trainer.model.forward
    evaluated = []

    def forward_signalled_in_evaluation(*args, **kwargs):
        if not torch.is_grad_enabled():  # an evaluation's micro-batch
            evaluated.append(trainer.step)
            if rank == 1 and len(evaluated) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: a flag, read collectively
        return forward(*args, **kwargs)

    trainer.model.forward = forward_signalled_in_evaluation
    trainer.fit()
    return evaluated, trainer.step


@pytest.mark.parametrize("max_steps", [6, 2], ids=["mid-run", "last-step"])
def test_a_stop_signal_during_an_evaluation_abandons_it_and_saves_at_once(
    corpus, eval_corpus, tmp_path, max_steps
):
    """Slurm gives a signalled run two minutes to save: an evaluation (here 2 domains x 3 global
    batches) is cut short at its next micro-batch on every rank, and the checkpoint is of its step.
    The last step's evaluation is not: nothing would evaluate that step again."""
    run_dir = tmp_path / "signalled"
    arguments = (str(corpus), str(eval_corpus), str(run_dir), max_steps)
    results = run_on_ranks(train_with_sigterm_in_evaluation, 2, tmp_path, *arguments, timeout=240)
    last = max_steps == 2
    for evaluated, step in results:
        # one micro-batch of the 12, then stopped; or all 12
        assert evaluated == [2] * (12 if last else 1) and step == 2, (evaluated, step)
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    assert ("eval_lm_loss" in rows[-1]) == last  # no metrics of half an evaluation
    state = json.loads((run_dir / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    log = (run_dir / "train.log").read_text()
    assert ("evaluation after step 2 abandoned" in log) != last
    if not last:
        assert "stop signal on another rank: stopped after step 2" in log  # rank 1 got it


# ---------------------------------------------------------------------------------------------
# Bad steps, in-process on 2 ranks


def train_with_nan_steps(rank, world, corpus: str, run_dir: str, zero_stage: int, nan_steps: list[int]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs, validate_layout
    from train.trainer import BadStepsError, Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # as torchrun sets them
    register_configs()
    extra = {
        "checkpoint.every": 1,
        "trainer.max_bad_steps": 3,
        "parallel.zero_stage": zero_stage,
        "loss.expert_bias_rate": 0.0,
    }
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose("pretrain", overrides=overrides(Path(corpus), Path(run_dir), **extra))
    cfg = OmegaConf.to_object(raw)
    trainer = Trainer(cfg, validate_layout(cfg, world))
    forward = trainer.model.forward

    def forward_with_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 in nan_steps and rank == 1:  # one rank's NaN must stop every rank's update
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    trainer.model.forward = forward_with_nan
    try:
        trainer.fit()
    except BadStepsError as error:
        message = str(error)
    else:
        message = None
    params = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters()}
    return message, params


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_bad_steps_are_skipped_and_too_many_stop_the_run(corpus, tmp_path, zero_stage):
    run_dir = tmp_path / "bad"
    results = run_on_ranks(
        train_with_nan_steps, 2, tmp_path, str(corpus), str(run_dir), zero_stage, [2, 4, 5, 6], timeout=240
    )
    message, params = results[0]
    assert message is not None and "3 steps in a row" in message and "step_3" in message
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["bad_step"] for row in rows] == [0, 1, 0, 1, 1, 1]
    assert rows[-1]["skipped_steps"] == 4
    assert all(np.isfinite(row["lm_loss"]) for row in (rows[0], rows[2]))

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert checkpoints[-1] == "step_3", checkpoints
    # the skipped steps 4-6 left the weights of step 3's checkpoint
    saved = torch.load(
        run_dir / "checkpoints" / "step_3" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=True,
    )["module"]
    for name, value in params.items():
        assert torch.equal(value, saved[name]), f"{name} changed during skipped steps"


def test_layout_changes_and_rewinds_keep_the_run_consistent(corpus, tmp_path):
    """ZeRO 1 without expert parallelism: 2 processes for 2 steps, then 1 process to step 4 through
    the universal form (the losses of 4 uninterrupted steps); then a rewind to step_2
    (checkpoint.resume=PATH) sets step_4 aside and rewrites step_4 from a fresh conversion."""
    exact = {"optim.eps": 1.0, "optim.lr": 0.3, "optim.schedule_steps": 4, "checkpoint.every": 2}
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    pretrain(1, overrides(corpus, reference, **exact, **{"trainer.max_steps": 4}))
    pretrain(2, overrides(corpus, run_dir, **exact, **{"trainer.max_steps": 2}))
    output = pretrain(1, overrides(corpus, run_dir, **exact, **{"trainer.max_steps": 4}))
    assert "converting it to universal form" in output
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=1e-5)

    step_2 = run_dir / "checkpoints" / "step_2"
    output = pretrain(
        1, overrides(corpus, run_dir, **exact, **{"trainer.max_steps": 4, "checkpoint.resume": step_2})
    )
    assert "moved 1 checkpoint(s) after step 2" in output
    assert len(list((run_dir / "checkpoints" / ".abandoned").glob("*/step_4"))) == 1
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=1e-5)
