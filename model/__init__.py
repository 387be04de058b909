"""Single-device Qwen3-Next model: hybrid Gated DeltaNet / gated attention, sparse MoE, MTP."""

from model.config import ModelConfig, load_model_config
from model.qwen3_next import Qwen3NextForCausalLM

__all__ = ["ModelConfig", "Qwen3NextForCausalLM", "load_model_config"]
