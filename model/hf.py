"""HF interop: read and write checkpoints in the hub layout of `Qwen/Qwen3-Next-80B-A3B-*`.

Our state dict already uses HF's names; the one difference is expert storage. We keep each MoE
layer's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]);
the hub stores one key per expert and projection (`mlp.experts.{j}.gate_proj.weight`, ...). MTP
weights travel as the hub's `mtp.*` keys, which `transformers.Qwen3NextForCausalLM` ignores.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from model.config import ModelConfig
from model.qwen3_next import Qwen3NextForCausalLM

FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<which>gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
HF_ONLY_CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "use_cache": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
SHARD_BYTES = 4 * 1024**3


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    fields = config.to_dict()
    fields["num_nextn_predict_layers"] = fields.pop("mtp_num_layers")
    return {
        **HF_ONLY_CONFIG,
        **fields,
        "layer_types": config.layer_types,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def model_config_from_hf(hf: dict, mtp_num_layers: int | None = None) -> ModelConfig:
    known = set(ModelConfig.__dataclass_fields__)
    values = {k: v for k, v in hf.items() if k in known}
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in values and key in rope:
            values[key] = rope[key]
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: rope_type {rope['rope_type']!r} is not supported (only 'default')")
    if mtp_num_layers is not None:
        values["mtp_num_layers"] = mtp_num_layers
    else:
        values["mtp_num_layers"] = hf.get("num_nextn_predict_layers", hf.get("mtp_num_hidden_layers", 0))
    return ModelConfig(**values)


def to_hub_tensors(state_dict: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (hub key, tensor), splitting fused experts into one key per expert."""
    for name, tensor in state_dict.items():
        match = FUSED_EXPERTS.match(name)
        if match is None:
            yield name, tensor
        elif match["which"] == "gate_up_proj":
            intermediate = tensor.shape[1] // 2
            for j in range(tensor.shape[0]):
                yield f"{match['prefix']}.{j}.gate_proj.weight", tensor[j, :intermediate]
                yield f"{match['prefix']}.{j}.up_proj.weight", tensor[j, intermediate:]
        else:
            for j in range(tensor.shape[0]):
                yield f"{match['prefix']}.{j}.down_proj.weight", tensor[j]


def from_hub_tensors(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Hub keys (per-expert or already fused, as transformers 5 holds them) -> our state dict."""
    out, per_expert = {}, {}
    for name, tensor in tensors.items():
        match = PER_EXPERT.match(name)
        if match is None:
            out[name] = tensor
        else:
            per_expert.setdefault(match["prefix"], {})[(int(match["expert"]), match["proj"])] = tensor
    for prefix, parts in per_expert.items():
        missing = [
            (j, p)
            for j in range(num_experts)
            for p in ("gate_proj", "up_proj", "down_proj")
            if (j, p) not in parts
        ]
        if missing:
            j, proj = missing[0]
            raise ValueError(
                f"checkpoint lacks {prefix}.{j}.{proj}.weight ({len(missing)} expert weights missing)"
            )
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(j, "gate_proj")], parts[(j, "up_proj")]]) for j in range(num_experts)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts[(j, "down_proj")] for j in range(num_experts)])
    return out


def save_hf(
    model: Qwen3NextForCausalLM, out_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> None:
    """Write config.json + sharded safetensors (+ index) that transformers and vLLM load."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in to_hub_tensors(state):
        tensor = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2))


def read_hub_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def load_hf(
    hf_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mtp_num_layers: int | None = None,
    seed: int = 0,
) -> Qwen3NextForCausalLM:
    """Build our model from a hub-layout directory. MTP layers absent from the checkpoint (plain
    transformers exports have none) are created only when `mtp_num_layers` asks, with seeded init."""
    from model.init import init_weights

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found")
    hf_config = json.loads(config_path.read_text())
    tensors = read_hub_tensors(hf_dir)
    if mtp_num_layers is None and "num_nextn_predict_layers" not in hf_config:
        mtp_num_layers = len({k.split(".")[2] for k in tensors if k.startswith("mtp.layers.")})
    config = model_config_from_hf(hf_config, mtp_num_layers)
    state = from_hub_tensors(tensors, config.num_experts)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    model.to_empty(device=device)
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected weights, e.g. {unexpected[:3]} ({len(unexpected)} in all)")
    missing = sorted(expected - set(state))
    if missing and not all(k.startswith("mtp.") for k in missing):
        raise ValueError(f"{hf_dir}: missing weights, e.g. {missing[:3]} ({len(missing)} in all)")
    if missing:
        init_weights(model, config, seed)
    model.load_state_dict(state, strict=False)
    return model.to(dtype or next(iter(state.values())).dtype)
