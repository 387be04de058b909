"""A DeepSpeed checkpoint of our model read lazily, in the model's names and layout.

Why: the 80B model's checkpoint is hundreds of GB, so converting it (`launch/convert_hf.py to-hf`)
cannot load it whole. `CheckpointFiles` reads it like `model.hf.WeightFiles` reads safetensors:
`read` takes `model.tensor_files.TensorRequest`s (whole tensors, or some experts / rows of the fused expert
tensors) and yields the pieces file by file. Each file is mapped with `torch.load(mmap=True)` once
per `read` call and dropped before the next: the pages a call touches stay resident only while
that call reads the file, so a caller that reads one output file's tensors per call holds about
that much of the checkpoint at a time.

The layouts launch/pretrain.py writes, all presented in our names (fused `experts.gate_up_proj`
[E, 2I, H] with the gate rows first, `experts.down_proj` [E, H, I]):
- native with AutoEP (parallel/expert.py): `mp_rank_00_model_states.pt` holds the non-expert tensors
  under "module" in AutoEP's names (`mlp.router.gate.weight`, `mlp.shared_experts.*`), and each
  expert has its file `layer_{L}_expert_{e}_mp_rank_XX_model_states.pt` with `...mlp.experts.w1.{e}`
  (gate [I, H]), `w3.{e}` (up), `w2.{e}` (down [H, I]);
- native without AutoEP: our names, experts fused, all in `mp_rank_00`;
- tensor parallel: one `mp_rank_XX` file per TP rank, each holding that rank's slice of the heads;
  the slices are put back where `parallel.tensor.apply_tensor_parallel` took them from;
- DeepSpeed's universal form (`step_N_universal/`): `zero/<name>/fp32.pt` per parameter (whole, AutoEP
  expert tensors [E, I, H] included), buffers in `mp_rank_00`.
Buffers such as the aux-loss-free `expert_bias` are listed under their own names.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from model.config import ModelConfig
from model.tensor_files import (
    K,
    StoredPart,
    StoredParts,
    TensorRequest,
    expert_parts,
    group_by_file,
    model_shapes,
    whole_part,
)
from parallel.expert import block_layout_name

MODULE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPERT_KEY = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<w>w[123])\.(?P<expert>\d+)$")
UNIVERSAL_EXPERTS = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<w>w[123])$")


def load_lazily(path: Path) -> dict:
    """The file's objects with every tensor mapped from disk, not read (pages load when touched). A
    file in torch's legacy (non-zip) format cannot be mapped and is read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot read it as a torch checkpoint file ({error})") from error


def tensors_of(path: Path, loaded: dict) -> Mapping[str, torch.Tensor]:
    """The tensors of a loaded checkpoint file by key: a module file's "module", any other file itself."""
    if not MODULE_FILE.match(path.name):
        return loaded
    if not isinstance(loaded, dict) or "module" not in loaded:
        raise ValueError(f"{path}: holds no 'module' entry (not a DeepSpeed model-states file)")
    return loaded["module"]


def contiguous_runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position in the shard, position in the whole tensor, length) of each run of consecutive
    indices in a tensor-parallel shard's index."""
    values = index.tolist()
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((start, values[start], i - start))
            start = i
    return runs


def tensor_parallel_shards(config: ModelConfig, tp: int, tp_rank: int) -> dict[str, tuple[int, torch.Tensor]]:
    """name -> (dim, index of the whole tensor) of each tensor a TP rank holds a slice of."""
    from model.qwen3_next import Qwen3NextForCausalLM
    from parallel.tensor import TensorParallelPosition, apply_tensor_parallel

    with torch.device("meta"):
        plan = Qwen3NextForCausalLM(config)
    apply_tensor_parallel(plan, TensorParallelPosition(tp, tp_rank))
    return {name: p.tp_shard for name, p in plan.named_parameters() if hasattr(p, "tp_shard")}


class CheckpointFiles:
    """A checkpoint directory of launch/pretrain.py (`step_N` or `step_N_universal`) of the model
    `config`, read lazily in our names. Construction unpickles the module files' structure (their
    tensors stay on disk) and one expert file per MoE layer, to learn what is where."""

    def __init__(self, checkpoint_dir: str | os.PathLike, config: ModelConfig):
        self.directory = Path(checkpoint_dir)
        self.config = config
        self._whole_shapes = model_shapes(config)
        self._parts = StoredParts()
        self._dtypes: dict[str, torch.dtype] = {}
        self._file_order: dict[Path, int] = {}
        module_files = sorted(
            (int(m.group(1)), path)
            for path in self.directory.glob("mp_rank_*_model_states.pt")
            if (m := MODULE_FILE.match(path.name))
        )
        if not module_files:
            raise FileNotFoundError(
                f"{self.directory}: no mp_rank_XX_model_states.pt "
                "(not a DeepSpeed checkpoint of launch/pretrain.py)"
            )
        legacy = [path.name for _, path in module_files if not zipfile.is_zipfile(path)]
        if legacy:
            warnings.warn(
                f"{self.directory}: {legacy[0]} is in torch's legacy (non-zip) format, which cannot be "
                "mapped lazily: each read (each output file of convert_hf.py to-hf) loads it whole",
                stacklevel=2,
            )
        from_zero = self._add_universal() if (self.directory / "zero").is_dir() else set()
        self._add_module_files([path for _, path in module_files], skip=from_zero)
        self._add_expert_files()

    def names(self) -> set[str]:
        """Our names of every parameter and buffer the checkpoint holds."""
        return self._parts.names()

    def shape(self, name: str) -> torch.Size:
        self._check_has(name)
        return self._whole_shapes.get(name) or self._parts.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        self._check_has(name)
        return self._dtypes[name]

    def read(self, requests: Mapping[K, TensorRequest]) -> Iterator[tuple[K, tuple, torch.Tensor]]:
        """Pieces `(key, index, tensor)` of the requested tensors, `tensor` filling `requested[index]`
        (as `model.hf.WeightFiles.read`), file by file: each file is mapped once, yields every piece it
        holds and is dropped before the next one is mapped."""
        by_file = group_by_file(self._parts, requests, self.shape)
        for file in sorted(by_file, key=self._file_order.__getitem__):
            yield from self._read_file(file, by_file.pop(file))

    # -- what is where
    def _add(self, name: str, part: StoredPart, dtype: torch.dtype) -> None:
        self._file_order.setdefault(part.file, len(self._file_order))
        self._parts.add(name, part)
        self._dtypes.setdefault(name, dtype)

    def _add_universal(self) -> set[str]:
        """Parameters from `zero/<engine name>/fp32.pt`, whole; returns our names of them."""
        added = set()
        for path in sorted((self.directory / "zero").glob("*/fp32.pt")):
            engine_name = path.parent.name
            match = UNIVERSAL_EXPERTS.match(engine_name)
            if match is None:
                name = block_layout_name(engine_name)
                self._add(name, whole_part(path, "param", self._expected_shape(name, path)), torch.float32)
            else:
                name, part = self._universal_expert_part(match["block"], match["w"], path)
                self._add(name, part, torch.float32)
            added.add(name)
        return added

    def _universal_expert_part(self, block: str, w: str, path: Path) -> tuple[str, StoredPart]:
        """AutoEP's whole `experts.w1` / `w3` [E, I, H] (the gate / up rows of our gate_up_proj) or `w2`."""
        gate_up = f"{block}.experts.gate_up_proj"
        experts, rows, hidden = self._expected_shape(gate_up, path)
        if w == "w2":
            name = f"{block}.experts.down_proj"
            return name, whole_part(path, "param", self._expected_shape(name, path))
        first = 0 if w == "w1" else rows // 2
        box = ((0, experts), (first, first + rows // 2), (0, hidden))
        return gate_up, StoredPart(path, "param", box, (experts, rows // 2, hidden))

    def _add_module_files(self, files: list[Path], skip: set[str]) -> None:
        """Every tensor under "module" (AutoEP's names mapped to ours), TP ranks' slices joined."""
        tp = len(files)
        for rank, path in enumerate(files):
            shards = tensor_parallel_shards(self.config, tp, rank) if tp > 1 else {}
            loaded = load_lazily(path)
            for key, tensor in tensors_of(path, loaded).items():
                name = block_layout_name(key)
                if name in skip:
                    continue
                shape = tuple(tensor.shape)
                # whole-shaped though sharded: kept whole then (an LM head saved before the vocab split)
                if name in shards and torch.Size(shape) != self._whole_shapes.get(name):
                    for part in self._shard_parts(path, key, name, shape, *shards[name]):
                        self._add(name, part, tensor.dtype)
                elif rank == 0:
                    if name in self._whole_shapes and torch.Size(shape) != self._whole_shapes[name]:
                        raise ValueError(
                            f"{path}: {key} has shape {list(shape)}, the model of the checkpoint's "
                            f"config.yaml {list(self._whole_shapes[name])}"
                        )
                    self._add(name, whole_part(path, key, shape), tensor.dtype)
            del loaded

    def _shard_parts(
        self, path: Path, key: str, name: str, shape: tuple[int, ...], dim: int, index: torch.Tensor
    ) -> list[StoredPart]:
        """A TP rank's slice `index` (along `dim`) of our tensor `name`, one part per run of rows."""
        if shape[dim] != len(index):
            raise ValueError(
                f"{path}: {key} has {shape[dim]} rows along dim {dim}, "
                f"its tensor-parallel rank holds {len(index)}"
            )
        whole = [(0, n) for n in self._whole_shapes[name]]
        parts = []
        for in_shard, in_whole, length in contiguous_runs(index):
            box = tuple(
                (in_whole, in_whole + length) if d == dim else extent for d, extent in enumerate(whole)
            )
            start = tuple(in_shard if d == dim else 0 for d in range(len(shape)))
            parts.append(StoredPart(path, key, box, shape, source_start=start))
        return parts

    def _add_expert_files(self) -> None:
        """AutoEP's expert files: for each layer, every expert's w1 / w3 / w2 placed in our fused tensors."""
        by_layer: dict[int, dict[int, Path]] = {}
        for path in sorted(self.directory.glob("layer_*_expert_*_mp_rank_*_model_states.pt")):
            match = EXPERT_FILE.match(path.name)
            if match:  # the same expert under several TP ranks is replicated: the first (sorted) one
                by_layer.setdefault(int(match.group(1)), {}).setdefault(int(match.group(2)), path)
        for layer, files in sorted(by_layer.items()):
            block, dtype, (inter, hidden) = self._expert_layer(files[min(files)])
            num_experts = self._whole_shapes.get(f"{block}.experts.down_proj", (0,))[0]
            lacking = sorted(set(range(num_experts)) - set(files))
            extra = sorted(set(files) - set(range(num_experts)))
            if lacking or extra:
                raise ValueError(
                    f"{self.directory}: the expert files of AutoEP layer {layer} ({block}) do not fit the "
                    f"model's {num_experts} experts: missing {lacking[:3]}, extra {extra[:3]}"
                )
            for e, path in sorted(files.items()):
                gate = whole_part(path, f"{block}.experts.w1.{e}", (inter, hidden))
                up = whole_part(path, f"{block}.experts.w3.{e}", (inter, hidden))
                down = whole_part(path, f"{block}.experts.w2.{e}", (hidden, inter))
                for name, part in expert_parts(f"{block}.experts", e, gate, up, down):
                    self._add(name, part, dtype)

    def _expert_layer(self, path: Path) -> tuple[str, torch.dtype, tuple[int, int]]:
        """(our MoE block's name, dtype, gate's [I, H]) of a layer, from one of its expert files."""
        loaded = load_lazily(path)
        for key, tensor in loaded.items():
            match = EXPERT_KEY.match(key)
            if match and match["w"] == "w1":
                return match["block"], tensor.dtype, tuple(tensor.shape)
        raise ValueError(
            f"{path}: no AutoEP expert tensor `<block>.mlp.experts.w1.<e>` in {sorted(loaded)[:5]}"
        )

    def _expected_shape(self, name: str, path: Path) -> tuple[int, ...]:
        """The model's shape of `name`; for a buffer (not in the model's state dict) the file's."""
        if name in self._whole_shapes:
            return tuple(self._whole_shapes[name])
        return tuple(load_lazily(path)["param"].shape)

    def _check_has(self, name: str) -> None:
        if name not in self._parts:
            raise KeyError(f"{name} is not in the checkpoint {self.directory}")

    def _read_file(self, file: Path, items: list) -> Iterator[tuple]:
        loaded = load_lazily(file)
        tensors = tensors_of(file, loaded)
        for key, part, source, target in items:
            if part.key not in tensors:
                raise KeyError(f"{file}: no tensor {part.key!r}")
            stored = tensors[part.key]
            part.check_shape(stored)
            piece = part.piece(stored[source])
            del stored
            yield key, target, piece
            del piece
        del tensors, loaded  # unmaps the file: its touched pages leave this process


def consolidated_module_state(
    checkpoint_dir: str | os.PathLike, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """The whole state of a checkpoint in our names and layout (parameters in the model's order, then
    buffers such as `expert_bias`), as `Qwen3NextForCausalLM.load_state_dict` takes it. For small
    models: it holds everything in memory."""
    files = CheckpointFiles(checkpoint_dir, config)
    order = list(model_shapes(config))
    names = [n for n in order if n in files.names()] + sorted(files.names() - set(order))
    state = {name: torch.empty(files.shape(name), dtype=files.dtype(name)) for name in names}
    for name, index, piece in files.read({name: TensorRequest(name) for name in names}):
        state[name][index].copy_(piece)
    return state
