"""The model's configuration: HF `Qwen3NextConfig` field names plus `mtp_num_layers`.

Presets live as YAML in `conf/model/` (tiny, small, 80b_a3b); `load_model_config(name)` reads one
without Hydra so that tests, the converter and notebooks can build a model directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


@dataclass
class ModelConfig:
    """Defaults are Qwen3-Next-80B-A3B (DESIGN.md §2)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    full_attention_interval: int = 4  # every 4th layer is gated attention, the others Gated DeltaNet
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
        self.validate()

    @property
    def layer_types(self) -> list[str]:
        return [
            "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
            for i in range(self.num_hidden_layers)
        ]

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
            "vocab_size", "hidden_size", "num_hidden_layers", "full_attention_interval",
            "num_attention_heads", "num_key_value_heads", "head_dim", "linear_num_key_heads",
            "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "moe_intermediate_size", "decoder_sparse_step",
            "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
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
