"""Each rank builds, initialises and holds only its own shard (parallel/build.py).

- Initial weights: on 4 gloo processes, dp4 (plain and with AutoEP's layers at expert 1), dp4 x ep2,
  dp4 x ep4, tp2 x dp2 and tp2 x dp2 with ep2 folded onto the tensor pairs, the trainer's own model
  and DeepSpeed engine (`build_model`, `build_engine`) hold, on every rank, exactly (bit for bit)
  what the 1-process model's seeded weights (`model.init.init_weights`) give when cut the old way,
  on real tensors (head sharding in place, AutoEP's copying replacement at the engine's expert rank),
  and the ranks together cover every element of every parameter of that model. The same for
  weights read from `checkpoint.init_from` (a hub-layout directory of many small files) under ep2
  and tp2 x ep2.
- Memory: on 4 processes with parallel.expert=4 and a model whose experts are most of its bytes,
  each process's peak resident memory over the construction (the model materialised and initialised,
  before the engine) stays within its baseline plus 1.2x the bytes of its own shard, measured by the
  kernel (VmHWM after resetting it), while the whole model is more than twice that.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed.gloo import run_on_ranks
from tests.distributed.test_training import MODEL

REPO = Path(__file__).resolve().parents[2]
WORLD = 4
LAYOUTS = {
    "dp4": {},
    "dp4-autoep": {"parallel.autoep": True},
    "dp4-ep2": {"parallel.expert": 2},
    "dp4-ep4": {"parallel.expert": 4},
    "tp2-dp2": {"parallel.tensor": 2},
    "tp2-dp2-ep2": {"parallel.tensor": 2, "parallel.expert": 2},
}
# experts are ~90% of the fp32 bytes: 64 experts of width 512 at hidden 256, over 5 MoE layers
EXPERT_HEAVY = {"hidden_size": 256, "num_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 512}


def compose(overrides: dict) -> object:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs

    register_configs()
    values = {f"model.{k}": v for k, v in MODEL.items()}
    values.update({"trainer.global_batch_size": 8, "trainer.micro_batch_size": 2, "data.streams": 4})
    values.update(overrides)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_object(
            hydra_compose("pretrain", ["conf=tiny", *(f"{k}={v}" for k, v in values.items())])
        )


def start_deepspeed(rank: int, world: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from parallel.engine import quiet_deepspeed, skip_cpu_shm_build

    quiet_deepspeed()
    skip_cpu_shm_build()


def shards_against_whole(rank: int, world: int, cases: list[tuple[str, dict, int | None]]) -> dict:
    """`rank_shard_against_whole` for each (name, overrides, reference seed) case in turn, in this one
    process (a process start costs more than a case)."""
    return {name: rank_shard_against_whole(rank, world, overrides, seed) for name, overrides, seed in cases}


def rank_shard_against_whole(rank: int, world: int, overrides: dict, reference_seed: int | None = None):
    """This rank's engine-held parameters against the reference: the 1-process model (seeded init,
    with `reference_seed` when the run starts from weights saved with that seed) cut the way the
    trainer used to cut it, on real tensors: the whole model sharded over the heads in place, its MoE
    blocks replaced by AutoEP's own copying replacement for the expert rank the engine gave this
    process. Returns (name, whether equal, its origin's parts for the coverage check) per parameter."""
    start_deepspeed(rank, world)
    import torch.distributed as dist
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import parse_autoep_config

    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM
    from parallel.build import origins
    from parallel.expert import autoep_config, autoep_layers
    from parallel.tensor import TensorParallelPosition, apply_tensor_parallel
    from train.build import build_training
    from train.config import uses_autoep, validate_layout

    cfg = compose(overrides)
    layout = validate_layout(cfg, world)
    autoep = uses_autoep(cfg, layout)
    init_from = Path(cfg.checkpoint.init_from) if cfg.checkpoint.init_from else None
    engine = build_training(cfg, layout, rank, torch.device("cpu"), init_from=init_from).engine

    whole = Qwen3NextForCausalLM(cfg.model)
    init_weights(whole, cfg.model, seed=cfg.trainer.seed if reference_seed is None else reference_seed)
    if layout.tensor > 1:
        apply_tensor_parallel(whole, TensorParallelPosition(layout.tensor, rank % layout.tensor))
    if autoep:
        engine_ep_rank = dist.get_rank(group=autoep_layers(engine.module)[0].ep_group)
        replacer = AutoEP(whole, parse_autoep_config(autoep_config(layout.expert)))
        replacer.replace_moe_layers(replacer.ep_parser(), ep_size=layout.expert, ep_rank=engine_ep_rank)
    reference = dict(whole.named_parameters())
    held = dict(engine.module.named_parameters())
    assert held.keys() == reference.keys()
    results = []
    for name, origin in origins(engine.module).items():
        parts = (
            origin.name,
            origin.experts,
            origin.rows,
            origin.tp_dim,
            None if origin.tp_index is None else origin.tp_index.tolist(),
        )
        results.append((name, torch.equal(held[name].detach(), reference[name].detach()), parts))
    return results


def covered(whole_shape: torch.Size, parts) -> torch.Tensor:
    """The elements of a whole tensor that an origin's parts select."""
    _, experts, rows, tp_dim, tp_index = parts
    mask = torch.zeros(whole_shape, dtype=torch.bool)
    view = mask[experts.start : experts.stop] if experts is not None else mask
    if rows is not None:
        view = view[:, rows]
    if tp_dim is not None:
        view.index_fill_(tp_dim, torch.tensor(tp_index), True)
    else:
        view.fill_(True)
    return mask


@pytest.fixture(scope="module")
def hub_weights(tmp_path_factory) -> Path:
    """The toy model with seed 7's weights in the HF hub layout, spread over many small files."""
    from model.hf import save_hf
    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM

    config = compose({}).model
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=7)
    directory = tmp_path_factory.mktemp("hub")
    save_hf(model, directory, max_shard_bytes=32 * 1024)
    assert len(list(directory.glob("*.safetensors"))) > 5
    return directory


FROM_HUB = ("dp4-ep2", "tp2-dp2-ep2")  # the layouts also started from `hub_weights`


@pytest.fixture(scope="module")
def engine_shards(tmp_path_factory, hub_weights) -> dict:
    """Every case's per-rank results. Layouts that share DeepSpeed's process-group set-up run in one
    set of 4 processes: the data-parallel ones, tp2 x dp2, and the folded tp2 x dp2 x ep2."""

    def case(layout: str, from_hub: bool = False):
        if from_hub:
            return f"{layout}-init-from", {**LAYOUTS[layout], "checkpoint.init_from": hub_weights}, 7
        return layout, LAYOUTS[layout], None

    batches = [
        [case("dp4"), case("dp4-autoep"), case("dp4-ep2"), case("dp4-ep4"), case("dp4-ep2", True)],
        [case("tp2-dp2")],
        [case("tp2-dp2-ep2"), case("tp2-dp2-ep2", True)],
    ]
    found = {}
    for number, cases in enumerate(batches):
        tmp = tmp_path_factory.mktemp(f"shards{number}")
        per_rank = run_on_ranks(shards_against_whole, WORLD, tmp, cases, timeout=300)
        for name, *_ in cases:
            found[name] = [results[name] for results in per_rank]
    return found


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_holds_exactly_its_slice_of_the_one_process_init(engine_shards, layout):
    from model.qwen3_next import Qwen3NextForCausalLM

    results = engine_shards[layout]
    unequal = [(rank, name) for rank, rows in enumerate(results) for name, equal, _ in rows if not equal]
    assert not unequal, f"parameters differing from the 1-process init's slice: {unequal[:5]}"

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in Qwen3NextForCausalLM(compose({}).model).named_parameters()}
    coverage = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    for rows in results:
        for _, _, parts in rows:
            coverage[parts[0]] |= covered(shapes[parts[0]], parts)
    missing = [name for name, mask in coverage.items() if not mask.all()]
    assert not missing, f"no rank holds part of {missing[:5]}"
    if LAYOUTS[layout].get("parallel.expert", 1) > 1:
        experts = [parts for rows in results for _, _, parts in rows if parts[1] is not None]
        assert experts and all(len(parts[1]) < MODEL["num_experts"] for parts in experts)


@pytest.mark.parametrize("layout", FROM_HUB)
def test_every_rank_loads_exactly_its_slice_of_init_from(engine_shards, layout):
    results = engine_shards[f"{layout}-init-from"]
    unequal = [(rank, name) for rank, rows in enumerate(results) for name, equal, _ in rows if not equal]
    assert not unequal, f"parameters differing from the saved weights' slice: {unequal[:5]}"


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def construction_memory(rank: int, world: int):
    """(resident KiB before, peak KiB during the construction, the shard's bytes, the whole model's
    fp32 bytes) of this rank's model under ep4, through the trainer's build_model."""
    start_deepspeed(rank, world)
    from model.qwen3_next import Qwen3NextForCausalLM
    from train.build import build_model
    from train.config import validate_layout

    cfg = compose({**{f"model.{k}": v for k, v in EXPERT_HEAVY.items()}, "parallel.expert": 4})
    layout = validate_layout(cfg, world)
    with torch.device("meta"):
        whole_bytes = sum(p.numel() * 4 for p in Qwen3NextForCausalLM(cfg.model).parameters())
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current size
    before = status_kib("VmRSS")
    model = build_model(cfg, layout, rank, torch.device("cpu"), tp_groups=None)
    peak = status_kib("VmHWM")
    shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    return before, peak, shard_bytes, whole_bytes


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_construction_peak_memory_is_the_ranks_own_shard(tmp_path):
    for rank, (before, peak, shard_bytes, whole_bytes) in enumerate(
        run_on_ranks(construction_memory, WORLD, tmp_path, timeout=240)
    ):
        assert whole_bytes > 2.5 * shard_bytes, "the test needs a model far larger than one shard"
        grown = (peak - before) * 1024
        assert grown <= 1.2 * shard_bytes, (
            f"rank {rank}: peak grew by {grown / 2**20:.1f} MiB for a shard of {shard_bytes / 2**20:.1f} MiB "
            f"(whole model {whole_bytes / 2**20:.1f} MiB)"
        )
        assert grown >= 0.9 * shard_bytes, f"rank {rank}: the shard's storage should show in the peak"
        print(f"rank {rank}: peak +{grown / 2**20:.1f} MiB, shard {shard_bytes / 2**20:.1f} MiB")
