"""HF interop: read and write checkpoints in the hub layout of `Qwen/Qwen3-Next-80B-A3B-*`, streaming.

Our state dict already uses HF's names; the one difference is expert storage. We keep each MoE
layer's experts fused (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]);
the hub stores one key per expert and projection (`mlp.experts.{j}.gate_proj.weight`, ...). MTP
weights travel as the hub's `mtp.*` keys, which `transformers.Qwen3NextForCausalLM` ignores.

Nothing here holds a whole checkpoint in memory (model/tensor_files.py says how):
- `WeightFiles` reads a directory of safetensors files lazily, in our names: the hub layout, or the
  one `launch/convert_hf.py from-hf` writes (our names, fused experts, model.yaml). Its `read` yields
  the requested tensors' pieces file by file, each file opened once and closed before the next.
- `write_hub_files` writes the hub layout one output file at a time from any reader.
`load_hf` and `save_hf` are the two directions for a model in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import ModelConfig
from model.qwen3_next import Qwen3NextForCausalLM
from model.tensor_files import (
    FUSED_EXPERTS,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SHARD_BYTES,
    K,
    OutputTensor,
    StateDictReader,
    StoredPart,
    StoredParts,
    TensorReader,
    TensorRequest,
    expert_parts,
    group_by_file,
    model_shapes,
    read_safetensors_header,
    whole_part,
    write_safetensors_files,
    write_text_atomically,
)

PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
HUB_CONFIG, OUR_CONFIG = "config.json", "model.yaml"
HF_ONLY_CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "use_cache": True,
}
# Qwen's <|endoftext|>; written only into a vocabulary that has it (transformers warns otherwise)
QWEN_SPECIAL_TOKEN_IDS = {"bos_token_id": 151643, "eos_token_id": 151643}


# -- config ------------------------------------------------------------------------------------------


def hf_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of the hub layout. `layer_types` is what transformers builds the layers from;
    `full_attention_interval` is written too where the pattern has one, for readers that know only it."""
    fields = config.to_dict()
    fields["num_nextn_predict_layers"] = fields.pop("mtp_num_layers")
    if fields["full_attention_interval"] is None:  # an irregular pattern: layer_types alone says it
        del fields["full_attention_interval"]
    return {
        **HF_ONLY_CONFIG,
        **special_token_ids(config.vocab_size),
        **fields,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def special_token_ids(vocab_size: int) -> dict[str, int]:
    return {key: token for key, token in QWEN_SPECIAL_TOKEN_IDS.items() if token < vocab_size}


def model_config_from_hf(hf: dict, mtp_num_layers: int | None = None) -> ModelConfig:
    """Our config from a config.json: the hub's (`full_attention_interval`, no `layer_types`) or
    transformers' (`layer_types`; an interval beside it is a leftover transformers ignores, so do we)."""
    lacking = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers") if key not in hf]
    if lacking:  # the defaults are the 80B's: an empty or foreign config would pass for it
        raise ValueError(f"config.json: lacks {', '.join(lacking)} (not a Qwen3-Next config?)")
    known = set(ModelConfig.__dataclass_fields__)
    values = {k: v for k, v in hf.items() if k in known}
    if values.get("layer_types") is not None:
        values.pop("full_attention_interval", None)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_scaling is {rope!r}, not an object")
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in values and key in rope:
            values[key] = rope[key]
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type": the older configs' name
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
    if mtp_num_layers is not None:
        values["mtp_num_layers"] = mtp_num_layers
    else:
        values["mtp_num_layers"] = hf.get("num_nextn_predict_layers", hf.get("mtp_num_hidden_layers", 0))
    return ModelConfig(**values)


def model_config_from_yaml(path: Path, mtp_num_layers: int | None = None) -> ModelConfig:
    """A ModelConfig saved as YAML (from-hf's model.yaml); unknown fields are refused by OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    saved = OmegaConf.load(path)
    if mtp_num_layers is not None:
        saved.mtp_num_layers = mtp_num_layers
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved))
    except (OmegaConfBaseException, ValueError) as error:
        raise ValueError(f"{path}: not a model config ({error})") from error


# -- reading -----------------------------------------------------------------------------------------


class WeightFiles:
    """A directory of safetensors files read lazily: the HF hub layout (config.json, per-expert keys
    `mlp.experts.{j}.gate_proj.weight` etc., optional model.safetensors.index.json) or the layout that
    `convert_hf.py from-hf` writes (our names, fused experts, model.yaml). Names, shapes and dtypes
    come from the file headers; tensors are read only by `read`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no such directory")
        self._headers = {file: read_safetensors_header(file) for file in self._listed_files()}
        config = self.model_config()
        self._num_experts = config.num_experts
        self._parts = StoredParts()
        self._missing_parts: dict[str, list[str]] = {}  # fused name -> the per-expert keys it lacks
        self._index_parts()
        if config.tie_word_embeddings and "lm_head.weight" not in self._parts:
            # transformers saves a tied model's embedding alone: the head reads it
            self._parts.alias("lm_head.weight", "model.embed_tokens.weight")

    # -- what the files hold
    def model_config(self, mtp_num_layers: int | None = None) -> ModelConfig:
        """From model.yaml (from-hf's output) or config.json (the hub's). Without `mtp_num_layers` a
        config.json lacking `num_nextn_predict_layers` (a transformers export) gets the MTP layers
        the files hold."""
        if (self.directory / OUR_CONFIG).exists():
            return model_config_from_yaml(self.directory / OUR_CONFIG, mtp_num_layers)
        path = self.directory / HUB_CONFIG
        if not path.exists():
            raise FileNotFoundError(f"{self.directory}: neither {HUB_CONFIG} nor {OUR_CONFIG} found")
        try:
            hf = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(hf, dict):
            raise ValueError(f"{path}: holds a JSON {type(hf).__name__}, not a config object")
        if mtp_num_layers is None and "num_nextn_predict_layers" not in hf:
            keys = (key for header in self._headers.values() for key in header)
            mtp_num_layers = len({key.split(".")[2] for key in keys if key.startswith("mtp.layers.")})
        try:
            return model_config_from_hf(hf, mtp_num_layers)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {str(error).removeprefix('config.json: ')}") from error

    def names(self) -> set[str]:
        """Our parameter names the files can provide (a fused expert name only when every expert's
        parts exist); keys the files hold but ours do not name are listed as they are."""
        return self._parts.names()

    def shape(self, name: str) -> torch.Size:
        self._check_has(name)
        return self._parts.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        self._check_has(name)
        part = self._parts.first(name)
        stored = self._headers[part.file][part.key][0]
        if stored not in SAFETENSORS_DTYPES:
            raise ValueError(f"{part.file}: {part.key} has dtype {stored}, which torch cannot hold here")
        return SAFETENSORS_DTYPES[stored]

    def missing_expert_parts(self) -> list[str]:
        """The per-expert keys that keep a layer's experts from being complete (empty when none)."""
        return sorted({key for keys in self._missing_parts.values() for key in keys})

    def read(self, requests: Mapping[K, TensorRequest]) -> Iterator[tuple[K, tuple, torch.Tensor]]:
        """Pieces `(key, index, tensor)` of the requested tensors, `tensor` filling `requested[index]`,
        file by file: each file is opened once, yields every piece it holds, and is closed before the
        next one is opened. A dense tensor is one piece with index (); fused experts read from per-expert
        keys come as one piece per (expert, projection), from fused keys as one piece."""
        by_file = group_by_file(self._parts, requests, self.shape)
        for file in self._headers:
            if file in by_file:
                yield from self._read_file(file, by_file.pop(file))

    # -- internals
    def _listed_files(self) -> list[Path]:
        index_path = self.directory / INDEX_FILE
        if not index_path.exists():
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory}: no *.safetensors files")
            return files
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not a safetensors index ({error})") from error
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: not a safetensors index (weight_map must map names to files)")
        files = [self.directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise FileNotFoundError(f"{index_path} names {file.name}, which does not exist")
        return files

    def _index_parts(self) -> None:
        located: dict[str, Path] = {}
        per_expert: dict[str, dict[tuple[int, str], StoredPart]] = {}
        for file, header in self._headers.items():
            for key, (_, shape) in header.items():
                if key in located:
                    raise ValueError(
                        f"{self.directory}: {key} is in both {located[key].name} and {file.name}"
                    )
                located[key] = file
                match = PER_EXPERT.match(key)
                if match and int(match["expert"]) < self._num_experts:
                    parts = per_expert.setdefault(match["prefix"], {})
                    parts[(int(match["expert"]), match["proj"])] = whole_part(file, key, shape)
                else:
                    self._parts.add(key, whole_part(file, key, shape))
        for prefix, found in per_expert.items():
            if f"{prefix}.gate_up_proj" in self._parts or f"{prefix}.down_proj" in self._parts:
                raise ValueError(
                    f"{self.directory}: the experts of {prefix} are stored both fused and per expert"
                )
            lacking = [
                f"{prefix}.{j}.{proj}.weight"
                for j in range(self._num_experts)
                for proj in PROJECTIONS
                if (j, proj) not in found
            ]
            if lacking:
                for which in ("gate_up_proj", "down_proj"):
                    self._missing_parts[f"{prefix}.{which}"] = lacking
                continue
            for j in range(self._num_experts):
                for name, part in expert_parts(prefix, j, *(found[(j, proj)] for proj in PROJECTIONS)):
                    self._parts.add(name, part)

    def _check_has(self, name: str) -> None:
        if name in self._parts:
            return
        if name in self._missing_parts:
            lacking = self._missing_parts[name]
            raise KeyError(
                f"{name}: {self.directory} lacks {lacking[0]} ({len(lacking)} expert weights missing)"
            )
        raise KeyError(f"{name} is not in {self.directory}")

    def _read_file(self, file: Path, items: list) -> Iterator[tuple]:
        # the handle (and with it the file's mapping) goes when this generator finishes
        with safe_open(file, framework="pt") as handle:
            for key, part, source, target in items:
                selected = handle.get_slice(part.key)[source] if source else handle.get_tensor(part.key)
                piece = part.piece(selected)
                del selected
                yield key, target, piece
                del piece


# -- writing -----------------------------------------------------------------------------------------


def hub_outputs(shapes: Mapping[str, Iterable[int]], dtype: torch.dtype) -> list[OutputTensor]:
    """Our tensors (name -> shape, in order) as the hub's keys: fused experts split into one key per
    expert and projection, everything else as it is."""
    outputs = []
    for name, shape in shapes.items():
        shape = tuple(shape)
        match = FUSED_EXPERTS.match(name)
        if match is None:
            outputs.append(OutputTensor(name, TensorRequest(name), shape, dtype))
            continue
        prefix, rows = match["prefix"], shape[1]
        for j in range(shape[0]):
            if match["which"] == "gate_up_proj":
                outputs.append(
                    one_expert_output(f"{prefix}.{j}.gate_proj.weight", name, shape, j, 0, rows // 2, dtype)
                )
                outputs.append(
                    one_expert_output(f"{prefix}.{j}.up_proj.weight", name, shape, j, rows // 2, rows, dtype)
                )
            else:
                outputs.append(
                    one_expert_output(f"{prefix}.{j}.down_proj.weight", name, shape, j, 0, rows, dtype)
                )
    return outputs


def one_expert_output(
    key: str, name: str, shape: tuple[int, ...], expert: int, start: int, stop: int, dtype: torch.dtype
) -> OutputTensor:
    """Rows [start, stop) of one expert's matrix of the fused tensor `name` (of `shape`), stored as `key`."""
    request = TensorRequest(name, range(expert, expert + 1), slice(start, stop))
    return OutputTensor(key, request, (1, stop - start, *shape[2:]), dtype, one_expert=True)


def write_hub_files(
    reader: TensorReader,
    shapes: Mapping[str, Iterable[int]],
    config: ModelConfig,
    out_dir: str | os.PathLike,
    dtype: torch.dtype,
    max_file_bytes: int = SHARD_BYTES,
    on_file: Callable[[str, int], None] | None = None,
) -> None:
    """config.json + the hub layout's safetensors files of our tensors `shapes` (name -> shape), read
    from `reader` and stored in `dtype`."""
    write_safetensors_files(reader, hub_outputs(shapes, dtype), out_dir, max_file_bytes, on_file)
    write_text_atomically(Path(out_dir) / HUB_CONFIG, json.dumps(hf_config_dict(config, dtype), indent=2))


# -- the model in memory -----------------------------------------------------------------------------


def save_hf(
    model: Qwen3NextForCausalLM,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = SHARD_BYTES,
) -> None:
    """Write config.json + sharded safetensors (+ index) that transformers and vLLM load, one output
    file at a time (beyond the model, one file's tensors in memory)."""
    state = model.state_dict()
    dtype = dtype or next(iter(state.values())).dtype
    shapes = {name: tensor.shape for name, tensor in state.items()}
    write_hub_files(StateDictReader(state), shapes, model.config, out_dir, dtype, max_shard_bytes)


def check_weights(files: WeightFiles, expected: Mapping[str, Iterable[int]]) -> list[str]:
    """The expected names the files lack, which may only be `mtp.*` ones (a transformers export has
    none). Raises naming the directory for unexpected weights, other missing ones and other shapes."""
    lacking_parts = files.missing_expert_parts()
    if lacking_parts:
        count = len(lacking_parts)
        raise ValueError(
            f"{files.directory}: checkpoint lacks {lacking_parts[0]} ({count} expert weights missing)"
        )
    available = files.names()
    unexpected = sorted(available - set(expected))
    if unexpected:
        raise ValueError(
            f"{files.directory}: unexpected weights, e.g. {unexpected[:3]} ({len(unexpected)} in all)"
        )
    missing = [name for name in expected if name not in available]
    if any(not name.startswith("mtp.") for name in missing):
        raise ValueError(f"{files.directory}: missing weights, e.g. {missing[:3]} ({len(missing)} in all)")
    for name, shape in expected.items():
        if name in available and files.shape(name) != torch.Size(shape):
            raise ValueError(
                f"{files.directory}: {name} has shape {list(files.shape(name))}, the model {list(shape)}"
            )
    return missing


def common_dtype(files: WeightFiles, names: Iterable[str]) -> torch.dtype:
    """The dtype most of the named tensors are stored in."""
    return Counter(files.dtype(name) for name in names).most_common(1)[0][0]


@torch.no_grad()
def load_hf(
    hf_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mtp_num_layers: int | None = None,
    seed: int = 0,
) -> Qwen3NextForCausalLM:
    """Build our model from a hub-layout directory (or from-hf's output). MTP layers absent from the
    checkpoint (plain transformers exports have none) are created only when `mtp_num_layers` asks,
    with seeded init. The model is built on the meta device, materialised and filled piece by piece:
    peak host memory is the model plus one piece."""
    from model.init import initial_value

    files = WeightFiles(hf_dir)
    config = files.model_config(mtp_num_layers)
    expected = model_shapes(config)
    missing = check_weights(files, expected)
    present = [name for name in expected if name not in missing]
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    model.to(dtype or common_dtype(files, present))
    model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty made the tied head a parameter of its own
        model.lm_head.weight = model.model.embed_tokens.weight
    state = model.state_dict()
    for name in missing:
        state[name].copy_(initial_value(name, expected[name], config, seed))
    for name, index, piece in files.read({name: TensorRequest(name) for name in present}):
        target = state[name][index]
        if target.shape != piece.shape:
            raise ValueError(
                f"{hf_dir}: a piece of {name} has shape {list(piece.shape)}, expected {list(target.shape)}"
            )
        target.copy_(piece)
    return model
