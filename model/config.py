"""The model's configuration: HF `Qwen3NextConfig` field names plus `mtp_num_layers`.

Presets live as YAML in `conf/model/` (tiny, small, 80b_a3b); `load_model_config(name)` reads one
without Hydra so that tests, the converter and notebooks can build a model directly.

The layer pattern is `layer_types`, one entry per layer: "linear_attention" (Gated DeltaNet) or
"full_attention" (gated attention), any mix. `full_attention_interval` n is the shorthand "every n-th
layer is attention" that fills it when `layer_types` is not given (neither given: n = 4, Qwen3-Next's
and transformers' default). Given both, they must describe the same pattern, else ValueError naming
both: a preset's interval does not silently lose to, or override, an explicit list. Once built, the
interval is the one that makes `layer_types` (None when none does), so two configs of the same model
compare equal however their pattern was written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LINEAR_ATTENTION, FULL_ATTENTION = "linear_attention", "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)
DEFAULT_FULL_ATTENTION_INTERVAL = 4
PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


@dataclass
class ModelConfig:
    """Defaults are Qwen3-Next-80B-A3B as published (its Hugging Face config.json)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    # the layer pattern (module docstring): the list, or the interval that fills it; None = not given
    full_attention_interval: int | None = None
    layer_types: list[str] | None = None
    # gated attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10_000_000.0
    attention_bias: bool = False
    # Gated DeltaNet
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # MoE
    num_experts: int = 512
    num_experts_per_tok: int = 10
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    intermediate_size: int = 5120  # dense MLP width, used only by `mlp_only_layers`
    # the rest
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    mtp_num_layers: int = 1

    def __post_init__(self) -> None:
        self._check_scalar_types()
        self._resolve_layer_pattern()
        self.validate()

    def _check_scalar_types(self) -> None:
        """A config built from a dict (an HF config.json) gets no type checks from OmegaConf: a string
        where a number belongs is named here rather than failing in a comparison later."""
        accepted = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        accepted["int | None"] = (int, type(None))
        for spec in dataclasses.fields(self):
            types, value = accepted.get(spec.type), getattr(self, spec.name)
            if types is None:  # lists: checked where they are used
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"model.{spec.name} must be {spec.type}, got {value!r}")

    def _resolve_layer_pattern(self) -> None:
        """Fill `layer_types` from the interval (or check that both agree), then set the interval to
        the one of the pattern, so that equal models have equal configs."""
        interval = self.full_attention_interval
        if interval is not None and interval <= 0:
            raise ValueError(f"model.full_attention_interval must be positive, got {interval}")
        if self.layer_types is None:
            interval = interval or DEFAULT_FULL_ATTENTION_INTERVAL
            self.layer_types = interval_layer_types(interval, self.num_hidden_layers)
        else:
            if isinstance(self.layer_types, Sequence) and not isinstance(self.layer_types, str):
                self.layer_types = list(self.layer_types)  # a tuple, or OmegaConf's ListConfig
            check_layer_types(self.layer_types, self.num_hidden_layers)
            if interval is not None:
                check_interval_agrees(interval, self.layer_types)
        self.full_attention_interval = regular_interval(self.layer_types)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        """Raise ValueError naming the first field that makes the architecture impossible."""
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
            "linear_value_head_dim", "linear_conv_kernel_dim", "moe_intermediate_size", "decoder_sparse_step",
            "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"model.{name} must be positive and finite, got {getattr(self, name)}")
        check_layer_types(self.layer_types, self.num_hidden_layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"model.linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"model.linear_num_key_heads ({self.linear_num_key_heads})"
            )
        rot = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rot != int(rot) or int(rot) % 2:
            raise ValueError(
                f"model.partial_rotary_factor ({self.partial_rotary_factor}) times head_dim "
                f"({self.head_dim}) must be a positive even number of dimensions"
            )
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                f"({self.num_experts})"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"model.hidden_act must be 'silu' (Qwen3-Next), got {self.hidden_act!r}")
        if self.mtp_num_layers < 0:
            raise ValueError(f"model.mtp_num_layers must be >= 0, got {self.mtp_num_layers}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"model.mlp_only_layers has layers outside 0..{self.num_hidden_layers - 1}: {bad}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def differing_settings(saved: ModelConfig, current: ModelConfig, ignore: Sequence[str] = ()) -> list[str]:
    """`name: value there, value here` for each setting (but `ignore`) in which a saved model's
    config differs from this run's, in field order: what a refusal to load it names."""
    theirs, mine = saved.to_dict(), current.to_dict()
    return [
        f"{k}: {theirs[k]} there, {mine[k]} here" for k in mine if k not in ignore and mine[k] != theirs[k]
    ]


def interval_layer_types(interval: int, num_layers: int) -> list[str]:
    """Every `interval`-th layer attention, the others Gated DeltaNet (HF's `full_attention_interval`)."""
    return [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]


def regular_interval(layer_types: list[str]) -> int | None:
    """The interval that makes this pattern, None when none does (irregular, or no attention layer)."""
    if FULL_ATTENTION not in layer_types:
        return None
    interval = layer_types.index(FULL_ATTENTION) + 1  # the only candidate: the first attention layer's
    return interval if interval_layer_types(interval, len(layer_types)) == layer_types else None


def attention_layers(layer_types: list[str]) -> list[int]:
    return [i for i, layer_type in enumerate(layer_types) if layer_type == FULL_ATTENTION]


def check_layer_types(layer_types: list[str], num_layers: int) -> None:
    if isinstance(layer_types, str) or not isinstance(layer_types, list):
        raise ValueError(f"model.layer_types must be a list of {list(LAYER_TYPES)}, got {layer_types!r}")
    if len(layer_types) != num_layers:
        raise ValueError(
            f"model.layer_types has {len(layer_types)} entries, but model.num_hidden_layers is "
            f"{num_layers}: it needs one per layer"
        )
    for i, layer_type in enumerate(layer_types):
        if layer_type not in LAYER_TYPES:
            raise ValueError(
                f"model.layer_types[{i}] is {layer_type!r}; each entry must be one of {list(LAYER_TYPES)}"
            )


def check_interval_agrees(interval: int, layer_types: list[str]) -> None:
    """Both keys given: they must describe the same layers (the user meant one pattern, not two)."""
    implied = interval_layer_types(interval, len(layer_types))
    if implied != layer_types:
        raise ValueError(
            f"model.full_attention_interval ({interval}) puts attention at layers "
            f"{attention_layers(implied)}, but model.layer_types at {attention_layers(layer_types)}; "
            "give only one of the two (the other null)"
        )


def load_model_config(preset: str, **overrides) -> ModelConfig:
    """Build the config of a preset in conf/model/ (e.g. 'tiny'), with field overrides."""
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model preset {preset!r} (no {path.name} in conf/model/; known: {known})")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    values.pop("defaults", None)  # the Hydra schema line of the preset
    values.update(overrides)
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"{path.name}: unknown model field(s) {unknown}")
    return ModelConfig(**values)
