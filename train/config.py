"""Typed configuration of a pretraining run: dataclasses registered in Hydra's ConfigStore.

`launch/pretrain.py conf=PRESET [overrides]` composes conf/pretrain.yaml, the groups model/,
parallel/, data/, optim/, trainer/, loss/, checkpoint/, logging/ and the preset conf/conf/PRESET.yaml
over these schemas, so an unknown key or a wrong type fails before any work, naming the key.
`validate_layout` then checks the settings against each other and the world size.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from model.config import ModelConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size of the attention / DeltaNet heads
    expert: int = 1  # expert-parallel size of the MoE
    zero_stage: int = 1
    # DeepSpeed AutoEP for the MoE: None = when expert > 1. On at expert 1 too, the checkpoints keep
    # AutoEP's parameter names, so that they reshard to any expert-parallel size (and back).
    autoep: bool | None = None
    # with expert > 1: cut each MoE layer's tokens into this many chunks whose all-to-alls overlap
    # the experts' compute (parallel/expert_overlap.py); 1: AutoEP's own all-to-all, then experts
    expert_chunks: int = 1
    # run on a DeepSpeed version parallel/engine.py's changes were not checked on (it refuses one)
    untested_deepspeed: bool = False


@dataclass
class DataConfig:
    path: str = "data/demo"
    index: str | None = None  # index.json location when `path` is a URL pattern
    seq_len: int = 512
    num_workers: int = 1
    streams: int = 16  # fixed stream count: batches do not depend on world size (dp must divide it)
    shuffle_buffer: int = 0
    skip_corrupt: bool = False
    verify_sha256: bool = True
    # held-out shards (the same format) for trainer.eval_every; their index.json beside them
    eval_path: str | None = None
    # streams the held-out shards are read in (None: data.streams); a small held-out set needs fewer
    eval_streams: int | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of schedule_steps decays
    schedule_steps: int | None = None  # the schedule's horizon; default trainer.max_steps


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1
    seed: int = 0
    dry_run: bool = False
    dry_run_world_size: int | None = None
    dry_run_rank: int | None = None  # with dry_run: build and initialise this rank's shard on the CPU
    gpu_memory_gb: float = 80.0
    activation_checkpointing: bool = False
    # with activation_checkpointing: recompute only the first N decoder layers in backward and keep the
    # others' activations (None: all of them); the dry run says the fewest that fit gpu_memory_gb
    recompute_layers: int | None = None
    # selective recomputation: below 1, torch.compile's partitioner keeps at most this fraction of what
    # each compiled graph would save for backward beyond its inputs, recomputing the cheapest ops first
    # (norms, gates, SwiGLU activations); process-wide, so every graph compiled in the run (the layers
    # kept whole matter; model/qwen3_next.py: compile_layers). Needs trainer.compile
    recompute_budget: float = 1.0
    compile: bool = True  # torch.compile the decoder layers on GPU (ignored on CPU)
    # torch.compile the small elementwise chains (norms, RoPE, SwiGLU, ...) on GPU where they run
    # outside a compiled layer: with trainer.compile=false, or in the LM head's CE (model/ops/fusion.py)
    compile_fusions: bool = True
    # packed documents through varlen flash attention on GPU, else a block-diagonal mask
    # (model/ops/attention.py)
    varlen_attention: bool = True
    log_every: int = 1
    profile_step: int = 0  # > 0: torch.profiler over this step and the next profile_steps - 1
    profile_steps: int = 2
    max_bad_steps: int = 3
    eval_every: int = 0  # > 0: evaluate on data.eval_path every this many steps (and at the last)
    eval_batches: int = 4  # global batches of trainer.global_batch_size sequences an evaluation reads


@dataclass
class LossConfig:
    mtp_weight: float = 0.3
    lb_coef: float = 1e-3
    # the load-balancing loss over the global batch (Qiu et al. 2025), or each micro-batch of each rank
    # balanced on its own, as most frameworks do (train/losses.py)
    lb_scope: str = "global"
    z_coef: float = 0.0
    expert_bias_rate: float = 0.0  # > 0: aux-loss-free balancing (DeepSeek-V3 used 1e-3), the bias step


@dataclass
class CheckpointConfig:
    every: int = 0  # 0: only at the end
    keep: int = 3  # complete checkpoints kept, the oldest removed first; 0 keeps them all
    resume: str = "auto"  # auto | none | a path
    init_from: str | None = None  # initial weights from `launch/convert_hf.py from-hf` (when not resuming)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with WANDB_API_KEY set, else offline) | offline | online | disabled
    project: str = "qwen3next-pretrain"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot_every: int = 10


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainConfig)
    for group, node in (
        ("model", ModelConfig),
        ("parallel", ParallelConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("trainer", TrainerConfig),
        ("loss", LossConfig),
        ("checkpoint", CheckpointConfig),
        ("logging", LoggingConfig),
    ):
        store.store(group=group, name=f"{group}_schema", node=node)


@dataclass(frozen=True)
class Layout:
    world: int
    tensor: int
    expert: int
    data: int  # data-parallel size of the attention/DeltaNet stack: world / tensor
    expert_data: int  # data-parallel size of the experts: world / expert
    grad_accum: int  # micro-batches per optimizer step on each rank


Range = tuple[typing.Callable[[float], bool], str]  # the test, and how a message states it


def at_least(low: float) -> Range:
    return (lambda value: math.isfinite(value) and value >= low), f">= {low:g}"


def above(low: float) -> Range:
    return (lambda value: math.isfinite(value) and value > low), f"> {low:g}"


def between(low: float, high: float, *, high_open: bool = False) -> Range:
    if high_open:
        return (lambda value: low <= value < high), f"in [{low:g}, {high:g})"
    return (lambda value: low <= value <= high), f"in [{low:g}, {high:g}]"


# each numeric setting's allowed range (None, where a key allows it, means "the default")
VALUE_RANGES = {
    "trainer.max_steps": at_least(0),  # 0: a checkpoint of the initial weights
    "trainer.recompute_layers": at_least(0),
    "trainer.recompute_budget": between(0.0, 1.0),
    "trainer.global_batch_size": at_least(1),
    "trainer.micro_batch_size": at_least(1),
    "trainer.seed": at_least(0),
    "trainer.gpu_memory_gb": at_least(0),
    "trainer.log_every": at_least(1),
    "trainer.profile_step": at_least(0),
    "trainer.profile_steps": at_least(1),
    "trainer.max_bad_steps": at_least(1),
    "trainer.eval_every": at_least(0),
    "parallel.tensor": at_least(1),
    "parallel.expert": at_least(1),
    "parallel.expert_chunks": at_least(1),
    "trainer.eval_batches": at_least(1),
    "data.eval_streams": at_least(1),
    "trainer.dry_run_world_size": at_least(1),
    "optim.lr": above(0),
    "optim.min_lr_ratio": between(0, 1),
    "optim.weight_decay": at_least(0),
    "optim.beta1": between(0, 1, high_open=True),
    "optim.beta2": between(0, 1, high_open=True),
    "optim.eps": above(0),
    "optim.grad_clip": at_least(0),
    "optim.warmup_steps": at_least(0),
    "optim.decay_fraction": between(0, 1),
    "optim.schedule_steps": at_least(1),
    "data.seq_len": at_least(2),
    "data.num_workers": at_least(0),
    "data.streams": at_least(1),
    "data.shuffle_buffer": at_least(0),
    "loss.mtp_weight": at_least(0),
    "loss.lb_coef": at_least(0),
    "loss.z_coef": at_least(0),
    "loss.expert_bias_rate": at_least(0),
    "checkpoint.every": at_least(0),
    "checkpoint.keep": at_least(0),
    "logging.plot_every": at_least(1),
}


def setting(cfg: PretrainConfig, key: str):
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def check_values(cfg: PretrainConfig) -> None:
    """Each numeric setting within its range, and run.dir a directory (or not there yet): checked
    before anything is built; ValueError names the key, the value and what is allowed."""
    for key, (allowed, description) in VALUE_RANGES.items():
        value = setting(cfg, key)
        if value is not None and not allowed(value):
            finite = "" if math.isfinite(value) else "finite and "
            raise ValueError(f"{key}={value} is out of range: it must be {finite}{description}")
    if not str(cfg.run.dir).strip():
        raise ValueError(
            "run.dir is empty; it names the run's directory (each preset sets one, e.g. runs/tiny)"
        )
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run.dir={cfg.run.dir} is a file; run.dir names the run's directory")


def unused_settings(cfg: PretrainConfig) -> list[str]:
    """Notes on settings that are valid but have no effect in this run, as it is configured: said at
    start, not refused (a preset may set them for runs that use them)."""
    notes = []
    if cfg.data.eval_path and not cfg.trainer.eval_every:
        notes.append(
            f"data.eval_path={cfg.data.eval_path} is set but trainer.eval_every=0: no evaluation runs"
        )
    horizon = cfg.optim.schedule_steps or cfg.trainer.max_steps
    if cfg.trainer.max_steps and cfg.optim.warmup_steps >= horizon:
        notes.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} spans the whole schedule ({horizon} steps): the "
            f"learning rate never reaches optim.lr={cfg.optim.lr:g}"
        )
    return notes


def validate_layout(cfg: PretrainConfig, world: int) -> Layout:
    """Check each setting's range, then the settings against each other and the world size;
    ValueError names the setting."""
    check_values(cfg)
    p, t, m, d = cfg.parallel, cfg.trainer, cfg.model, cfg.data
    checks = [
        (world >= 1, f"world size must be >= 1, got {world}"),
        (
            p.tensor >= 1 and world % p.tensor == 0,
            f"parallel.tensor ({p.tensor}) must divide the world size ({world})",
        ),
        (
            p.expert >= 1 and world % p.expert == 0,
            f"parallel.expert ({p.expert}) must divide the world size ({world})",
        ),
        (p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1 or 2, got {p.zero_stage}"),
        (
            p.tensor == 1 or p.expert > 1 or not p.autoep,
            f"parallel.tensor={p.tensor} with parallel.autoep=true needs parallel.expert >= 2: AutoEP folds "
            "its experts onto the tensor-parallel ranks, and at expert 1 each would compute every token",
        ),
        (
            p.tensor == 1 or p.expert == 1 or m.num_key_value_heads % p.tensor == 0,
            f"parallel.tensor={p.tensor} with parallel.expert={p.expert} needs model.num_key_value_heads "
            f"({m.num_key_value_heads}) divisible by parallel.tensor: AutoEP's folding reduces every "
            "parameter not sharded on all tensor ranks over the whole group, which a KV head kept by "
            "several ranks (marked sharded on the first of them only) cannot follow",
        ),
        (
            p.tensor == 1 or p.zero_stage >= 1,
            f"parallel.tensor={p.tensor} needs parallel.zero_stage 1 or 2 (got 0): the trainer's ZeRO-0 "
            "gradient checks assume every rank holds whole gradients",
        ),
        (
            p.expert == 1 or p.autoep is not False,
            f"parallel.expert={p.expert} runs on DeepSpeed AutoEP: parallel.autoep cannot be false",
        ),
        (
            p.expert == 1 or p.zero_stage >= 1,
            f"parallel.expert={p.expert} needs parallel.zero_stage 1 or 2 (got 0): without ZeRO, DeepSpeed "
            "clips expert-parallel gradients by an average of the ranks' norms, not the global norm",
        ),
        (
            p.expert_chunks == 1 or (p.expert > 1 and p.tensor == 1),
            f"parallel.expert_chunks={p.expert_chunks} overlaps the all-to-alls of expert parallelism "
            f"without tensor parallelism: it needs parallel.expert > 1 and parallel.tensor=1 (got expert="
            f"{p.expert}, tensor={p.tensor}); use parallel.expert_chunks=1",
        ),
        (
            t.recompute_budget == 1 or t.compile,
            f"trainer.recompute_budget={t.recompute_budget:g} steers torch.compile's partitioner: it needs "
            "trainer.compile=true (eager layers keep what autograd keeps); use trainer.recompute_budget=1",
        ),
        (
            p.zero_stage != 3,
            "parallel.zero_stage=3 is not supported yet: the chunked LM-head cross-entropy and the MTP "
            "module read weights outside their modules' forward, which ZeRO-3 does not gather; use 1 or 2",
        ),
        (
            m.num_experts % p.expert == 0,
            f"parallel.expert ({p.expert}) must divide model.num_experts ({m.num_experts})",
        ),
        (
            m.num_attention_heads % p.tensor == 0,
            f"parallel.tensor ({p.tensor}) must divide model.num_attention_heads ({m.num_attention_heads})",
        ),
        (
            m.linear_num_key_heads % p.tensor == 0,
            f"parallel.tensor ({p.tensor}) must divide model.linear_num_key_heads ({m.linear_num_key_heads})",
        ),
        (
            p.tensor % m.num_key_value_heads == 0 or m.num_key_value_heads % p.tensor == 0,
            f"parallel.tensor ({p.tensor}) and model.num_key_value_heads ({m.num_key_value_heads}) "
            "must divide one another (KV heads split, or replicated when tensor parallelism exceeds them)",
        ),
        (t.micro_batch_size >= 1, f"trainer.micro_batch_size must be >= 1, got {t.micro_batch_size}"),
        (d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}"),
        (
            d.seq_len <= m.max_position_embeddings,
            f"data.seq_len ({d.seq_len}) exceeds model.max_position_embeddings ({m.max_position_embeddings})",
        ),
        (
            cfg.optim.schedule in ("cosine", "wsd"),
            f"optim.schedule must be cosine or wsd, got {cfg.optim.schedule!r}",
        ),
        (
            t.eval_every == 0 or d.eval_path is not None,
            f"trainer.eval_every={t.eval_every} needs data.eval_path (held-out shards)",
        ),
        (
            cfg.loss.lb_scope in ("global", "micro_batch"),
            f"loss.lb_scope must be global or micro_batch, got {cfg.loss.lb_scope!r}",
        ),
        (
            cfg.logging.wandb.mode in ("auto", "offline", "online", "disabled"),
            f"logging.wandb.mode must be auto, offline, online or disabled, got {cfg.logging.wandb.mode!r}",
        ),
    ]
    if t.dry_run_rank is not None:
        checks += [
            (t.dry_run, "trainer.dry_run_rank needs trainer.dry_run=true (it builds a rank of a plan)"),
            (
                0 <= t.dry_run_rank < world,
                f"trainer.dry_run_rank ({t.dry_run_rank}) must be in 0..{world - 1} (the world size planned: "
                "trainer.dry_run_world_size)",
            ),
        ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    dp = world // p.tensor
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"trainer.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})"
        )
    if d.streams % dp:
        raise ValueError(f"the data-parallel size ({dp}) must divide data.streams ({d.streams})")
    return Layout(world, p.tensor, p.expert, dp, world // p.expert, t.global_batch_size // per_step)


def uses_autoep(cfg: PretrainConfig, layout: Layout) -> bool:
    """Whether the MoE runs on DeepSpeed AutoEP: parallel.autoep, by default when experts are split."""
    return cfg.parallel.autoep if cfg.parallel.autoep is not None else layout.expert > 1


def recomputed_layers(cfg: PretrainConfig) -> int:
    """How many decoder layers the run recomputes in backward (trainer.activation_checkpointing,
    trainer.recompute_layers)."""
    if not cfg.trainer.activation_checkpointing:
        return 0
    layers = cfg.model.num_hidden_layers
    return layers if cfg.trainer.recompute_layers is None else min(cfg.trainer.recompute_layers, layers)


# command-line arguments that select a config group (`conf=small`, `model=tiny`) rather than set a key
CONFIG_GROUPS = ("conf", "model", "parallel", "data", "optim", "trainer", "loss", "checkpoint", "logging")


def schema_keys(node: type | None = None, prefix: str = "") -> list[str]:
    """Every settable key of the run's config, dotted (`trainer.max_steps`, `logging.wandb.mode`)."""
    node = node or PretrainConfig
    hints = typing.get_type_hints(node)
    keys = []
    for item in dataclasses.fields(node):
        key = f"{prefix}{item.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[item.name]):
            keys += schema_keys(hints[item.name], f"{key}.")
    return keys


def check_override_keys(arguments: list[str]) -> None:
    """Refuse command-line overrides of keys the schema does not have, however they are written
    (`key=v`, and Hydra's `+key=v` / `++key=v`, which would otherwise add the key silently and the
    run ignore it), suggesting the closest key. Hydra's own options and group choices pass."""
    known = schema_keys()
    for argument in arguments:
        if argument.startswith(("-", "~")) or "=" not in argument:
            continue
        key = argument.split("=", 1)[0].lstrip("+")
        if key.startswith("hydra.") or key in CONFIG_GROUPS or key in known:
            continue
        settable = [k for k in known if not any(other.startswith(f"{k}.") for other in known)]
        close = difflib.get_close_matches(key, settable, n=1, cutoff=0.6)  # a value, not a group
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"unknown setting {key!r}{hint}; `python launch/pretrain.py --help` lists the common ones, "
            "train/config.py all of them"
        )
