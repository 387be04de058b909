"""Our model's tensors in files: read in parts, written one file at a time.

The 80B model is 160 GB in bf16 and no process ever holds it whole, so every reader and writer of
weights (model/hf.py's hub layout, parallel/checkpoint_files.py's DeepSpeed checkpoints) works in
pieces through the same vocabulary:
- a `TensorRequest` asks for one tensor of the single-device model by its state-dict name, or for
  some experts / rows of a fused expert tensor (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows
  first; `mlp.experts.down_proj` [E, H, I]);
- a reader's `read(requests)` yields pieces `(request key, index, tensor)`, each filling
  `requested[index]`, file by file;
- a `StoredPart` says which box of one of our tensors a stored tensor holds (a whole tensor, one
  expert's matrix, a tensor-parallel run of rows), and `StoredParts` finds the parts a request meets;
- `write_safetensors_files` writes `OutputTensor`s from any reader, one output file at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from model.config import ModelConfig
from model.qwen3_next import Qwen3NextForCausalLM

FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<which>gate_up_proj|down_proj)$")


SHARD_BYTES = 4 * 1024**3


BUFFER_ALIGNMENT = 64  # bytes; each output tensor starts at such an offset of its file's buffer


INDEX_FILE = "model.safetensors.index.json"


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


K = TypeVar("K")


Box = tuple[tuple[int, int], ...]  # [start, stop) per dim of one of our tensors


def model_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our model's state-dict names and shapes, in order, without allocating it."""
    with torch.device("meta"):
        return {name: t.shape for name, t in Qwen3NextForCausalLM(config).state_dict().items()}


# -- requests, and where stored tensors sit in ours --------------------------------------------------


@dataclass(frozen=True)
class TensorRequest:
    """A tensor of our model, or part of a fused expert tensor, to read."""

    name: str  # a state-dict name of our single-device model (experts fused)
    experts: range | None = None  # fused expert tensors only: these experts (dim 0), a contiguous range
    rows: slice | None = None  # fused expert tensors only: these rows of each expert's matrix (dim 1)


class TensorReader(Protocol):
    """What the writers read from: pieces `(key, index, tensor)`, `tensor` filling `requested[index]`."""

    def read(self, requests: Mapping[K, TensorRequest]) -> Iterator[tuple[K, tuple, torch.Tensor]]: ...


def request_box(request: TensorRequest, shape: Iterable[int]) -> Box:
    """The part of the tensor `request.name` (of `shape`) that the request asks for."""
    box = [(0, n) for n in shape]
    if (request.experts is not None or request.rows is not None) and not FUSED_EXPERTS.match(request.name):
        raise ValueError(f"{request.name}: experts / rows select parts of fused expert tensors only")
    if request.experts is not None:
        experts = request.experts
        if experts.step != 1 or not 0 <= experts.start < experts.stop <= box[0][1]:
            raise ValueError(
                f"{request.name}: experts {experts} is not a non-empty range within 0..{box[0][1]}"
            )
        box[0] = (experts.start, experts.stop)
    if request.rows is not None:
        rows = request.rows
        start = 0 if rows.start is None else rows.start
        stop = box[1][1] if rows.stop is None else rows.stop
        if rows.step not in (None, 1) or not 0 <= start < stop <= box[1][1]:
            raise ValueError(f"{request.name}: rows {rows} is not a non-empty slice within 0..{box[1][1]}")
        box[1] = (start, stop)
    return tuple(box)


def overlap_indices(
    part: Box, wanted: Box, one_expert: bool = False, source_start: tuple[int, ...] | None = None
) -> tuple[tuple, tuple] | None:
    """Where a stored tensor holding `part` of one of our tensors meets the requested box `wanted`:
    (index into the stored tensor, index into the requested tensor), or None when they do not meet.
    `one_expert`: the stored tensor lacks our dim 0 (one expert's matrix). `source_start`: where `part`
    begins in the stored tensor (zeros unless it is a run of rows of a larger shard). The index () is
    the whole tensor."""
    overlap = [(max(p0, w0), min(p1, w1)) for (p0, p1), (w0, w1) in zip(part, wanted, strict=True)]
    if any(start >= stop for start, stop in overlap):
        return None
    stored_dims = slice(1, None) if one_expert else slice(None)
    starts = source_start or (0,) * len(part[stored_dims])
    source = tuple(
        slice(start - p0 + s, stop - p0 + s)
        for (start, stop), (p0, _), s in zip(overlap[stored_dims], part[stored_dims], starts, strict=True)
    )
    target = tuple(
        slice(start - w0, stop - w0) for (start, stop), (w0, _) in zip(overlap, wanted, strict=True)
    )
    if source_start is None and list(overlap[stored_dims]) == list(part[stored_dims]):
        source = ()
    if overlap == list(wanted):
        target = ()
    return source, target


@dataclass(frozen=True)
class StoredPart:
    """A tensor stored under `key` in `file` that holds the box `box` of one of our tensors.

    `one_expert`: stored without our dim 0 (one expert's matrix, e.g. the hub's per-expert keys);
    `source_start`: where `box` begins in the stored tensor, when that holds more than the box (a run
    of rows of a tensor-parallel shard); `shape`: the stored tensor's shape."""

    file: Path
    key: str
    box: Box
    shape: tuple[int, ...]
    one_expert: bool = False
    source_start: tuple[int, ...] | None = None

    def indices(self, wanted: Box) -> tuple[tuple, tuple] | None:
        return overlap_indices(self.box, wanted, self.one_expert, self.source_start)

    def check_shape(self, stored: torch.Tensor) -> None:
        if tuple(stored.shape) != self.shape:
            raise ValueError(
                f"{self.file}: {self.key} has shape {list(stored.shape)}, expected {list(self.shape)}"
            )

    def piece(self, selected: torch.Tensor) -> torch.Tensor:
        """The selected part of the stored tensor as a piece in our layout: a copy, so that nothing
        keeps the file mapped once the reader has closed it."""
        piece = selected.clone(memory_format=torch.contiguous_format)
        return piece.unsqueeze(0) if self.one_expert else piece


def whole_part(file: Path, key: str, shape: Iterable[int]) -> StoredPart:
    shape = tuple(shape)
    return StoredPart(file, key, tuple((0, n) for n in shape), shape)


def expert_parts(
    prefix: str, expert: int, gate: StoredPart, up: StoredPart, down: StoredPart
) -> list[tuple[str, StoredPart]]:
    """(our name, part) of one expert's three matrices (gate [I, H], up [I, H], down [H, I], wherever
    stored) in our fused `{prefix}.gate_up_proj` (gate rows first) and `{prefix}.down_proj`."""
    (inter, hidden), e = gate.shape, (expert, expert + 1)
    for part, shape in ((up, (inter, hidden)), (down, (hidden, inter))):
        if part.shape != shape:
            raise ValueError(f"{part.file}: {part.key} has shape {list(part.shape)}, expected {list(shape)}")
    place = lambda part, box: StoredPart(part.file, part.key, box, part.shape, one_expert=True)
    return [
        (f"{prefix}.gate_up_proj", place(gate, (e, (0, inter), (0, hidden)))),
        (f"{prefix}.gate_up_proj", place(up, (e, (inter, 2 * inter), (0, hidden)))),
        (f"{prefix}.down_proj", place(down, (e, (0, hidden), (0, inter)))),
    ]


class StoredParts:
    """Where our tensors are stored: their parts by name. Parts holding one expert are indexed by
    expert, so that a request for a few experts of a 512-expert layer looks at those only."""

    def __init__(self) -> None:
        self._spanning: dict[str, list[StoredPart]] = {}  # dense tensors, and parts across all experts
        self._by_expert: dict[str, dict[int, list[StoredPart]]] = {}
        self._shapes: dict[str, list[int]] = {}

    def add(self, name: str, part: StoredPart) -> None:
        if part.one_expert:
            self._by_expert.setdefault(name, {}).setdefault(part.box[0][0], []).append(part)
        else:
            self._spanning.setdefault(name, []).append(part)
        shape = self._shapes.setdefault(name, [0] * len(part.box))
        for dim, (_, stop) in enumerate(part.box):
            shape[dim] = max(shape[dim], stop)

    def alias(self, name: str, of: str) -> None:
        """`name` is stored as `of` is (nothing, if `of` is not stored)."""
        for part in self._spanning.get(of, ()):
            self.add(name, part)

    def names(self) -> set[str]:
        return set(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> torch.Size:
        """The extent of the parts: our whole tensor's shape once every part is in."""
        return torch.Size(self._shapes[name])

    def first(self, name: str) -> StoredPart:
        spanning = self._spanning.get(name)
        return spanning[0] if spanning else next(iter(self._by_expert[name].values()))[0]

    def meeting(self, name: str, wanted: Box) -> Iterator[tuple[StoredPart, tuple, tuple]]:
        """(part, index into the stored tensor, index into the requested tensor) of every part that
        holds some of the box `wanted` of `name`."""
        by_expert = self._by_expert.get(name, {})
        experts = range(*wanted[0]) if by_expert else range(0)
        candidates = [*self._spanning.get(name, ()), *(p for e in experts for p in by_expert.get(e, ()))]
        for part in candidates:
            indices = part.indices(wanted)
            if indices is not None:
                yield part, *indices


def group_by_file(
    parts: StoredParts, requests: Mapping[K, TensorRequest], shape: Callable[[str], torch.Size]
) -> dict[Path, list[tuple[K, StoredPart, tuple, tuple]]]:
    """What each file holds of the requests: (request key, part, stored index, requested index)."""
    by_file: dict[Path, list] = {}
    for key, request in requests.items():
        for part, source, target in parts.meeting(request.name, request_box(request, shape(request.name))):
            by_file.setdefault(part.file, []).append((key, part, source, target))
    return by_file


# -- reading -----------------------------------------------------------------------------------------


LFS_POINTER = b"version https://git-lfs"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (safetensors dtype, shape) from a file's header, without mapping its data. The file must
    be as long as the header says: a truncated download fails here, naming the file, rather than
    when a conversion reaches its tensors."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            start = handle.read(len(LFS_POINTER))
            if start == LFS_POINTER:
                raise ValueError("a git-lfs pointer, not the weights: fetch them with `git lfs pull`")
            (length,) = struct.unpack("<Q", start[:8])
            if length > size - 8:
                raise ValueError(f"its header would be {length:,} bytes, more than the file's {size:,}")
            handle.seek(8)
            header = json.loads(handle.read(length))
            entries = {key: entry for key, entry in header.items() if key != "__metadata__"}
            data_end = 8 + length + max((entry["data_offsets"][1] for entry in entries.values()), default=0)
        if data_end > size:
            raise ValueError(
                f"truncated: its header places data up to byte {data_end:,}, the file has {size:,}"
            )
        return {key: (entry["dtype"], tuple(entry["shape"])) for key, entry in entries.items()}
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


# -- writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output file: `key` in the file, read as `request`, stored in `dtype`.
    `one_expert`: the request is one expert of a fused tensor, stored without the expert dim."""

    key: str
    request: TensorRequest
    shape: tuple[int, ...]  # the requested tensor's shape
    dtype: torch.dtype
    one_expert: bool = False

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.one_expert else self.shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_files(outputs: list[OutputTensor], max_file_bytes: int) -> list[list[OutputTensor]]:
    """Outputs in order, split into files of at most `max_file_bytes` (a larger tensor gets its own)."""
    files: list[list[OutputTensor]] = [[]]
    size = 0
    for output in outputs:
        if files[-1] and size + output.nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(output)
        size += output.nbytes
    return files


def read_outputs(reader: TensorReader, outputs: list[OutputTensor]) -> dict[str, torch.Tensor]:
    """The tensors of one output file, filled from the reader's pieces."""
    buffers = file_buffers(outputs)
    filled = dict.fromkeys(buffers, 0)
    for key, index, piece in reader.read({out.key: out.request for out in outputs}):
        target = buffers[key][index]
        if target.shape != piece.shape:
            raise ValueError(
                f"{key}: a piece of shape {list(piece.shape)} for {index}, which is {list(target.shape)}"
            )
        target.copy_(piece)
        filled[key] += piece.numel()
    for out in outputs:
        if filled[out.key] != math.prod(out.shape):
            raise RuntimeError(f"{out.key}: read {filled[out.key]} of its {math.prod(out.shape)} values")
    return {out.key: buffers[out.key].view(out.stored_shape) for out in outputs}


def file_buffers(outputs: list[OutputTensor]) -> dict[str, torch.Tensor]:
    """Empty tensors for one output file, carved from one anonymous memory mapping. It goes back to
    the system as soon as the file is written, where malloc would keep freed blocks of up to 32 MB
    for reuse (glibc's dynamic mmap threshold) and so blur what the conversion holds."""
    offsets, size = [], 0
    for out in outputs:
        offsets.append(size)
        size += -(-out.nbytes // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
    flat = (
        torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
        if size
        else torch.empty(0, dtype=torch.uint8)
    )
    return {
        out.key: flat[offset : offset + out.nbytes].view(out.dtype).view(out.shape)
        for out, offset in zip(outputs, offsets, strict=True)
    }


def write_safetensors_files(
    reader: TensorReader,
    outputs: list[OutputTensor],
    out_dir: str | os.PathLike,
    max_file_bytes: int = SHARD_BYTES,
    on_file: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """Write `outputs` as `model-0000i-of-0000N.safetensors` + model.safetensors.index.json, one file
    at a time: only one output file's tensors exist at once. Files are written under temporary names
    and renamed once all are complete; `on_file(name, bytes)` hears of each one written. The files an
    earlier index in `out_dir` listed and this one does not are then removed (`remove_earlier_weights`);
    a model.safetensors there is refused before anything is written (FileExistsError): loaders read it
    before any index, so it would hide what is written here. Returns the weight map (key -> file name)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if (out / SINGLE_FILE).exists():
        raise FileExistsError(
            f"{out / SINGLE_FILE} exists: transformers would load it instead of the files written here; "
            "remove it or write to another directory"
        )
    earlier = listed_files(out / INDEX_FILE)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_files(outputs, max_file_bytes)
    names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    try:
        for name, file_outputs in zip(names, plan, strict=True):
            tensors = read_outputs(reader, file_outputs)
            save_file(tensors, str(out / f"{name}.partial"), metadata={"format": "pt"})
            if on_file is not None:
                on_file(name, sum(o.nbytes for o in file_outputs))
    except BaseException:  # a failed or interrupted conversion leaves none of its files behind
        for name in names:
            (out / f"{name}.partial").unlink(missing_ok=True)
        raise
    mode = readable_file_mode()
    for name in names:
        os.chmod(out / f"{name}.partial", mode)  # safetensors creates its files 0600
        os.replace(out / f"{name}.partial", out / name)
    weight_map = {o.key: name for name, file_outputs in zip(names, plan, strict=True) for o in file_outputs}
    index = {"metadata": {"total_size": sum(o.nbytes for o in outputs)}, "weight_map": weight_map}
    write_text_atomically(out / INDEX_FILE, json.dumps(index, indent=2))
    remove_earlier_weights(out, earlier, keep=names)
    return weight_map


SINGLE_FILE = "model.safetensors"  # the unsharded name, which loaders read before any index


def listed_files(index_path: Path) -> set[str]:
    """The weight files an index lists (none where there is no readable index)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name for name in weight_map.values() if isinstance(name, str) and "/" not in name}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def remove_earlier_weights(out: Path, earlier: set[str], keep: list[str]) -> None:
    """The files of `out` that its earlier index listed (`earlier`) and the new one does not: left
    there, an earlier export's `model-*-of-M` files of another count would lie beside the new index.
    Files no index listed stay; each removal is said in a warning."""
    stale = sorted(name for name in earlier - set(keep) if (out / name).is_file())
    for name in stale:
        (out / name).unlink()
    if stale:
        warnings.warn(
            f"{out}: removed {len(stale)} weight file(s) of an earlier export ({', '.join(stale[:3])}"
            f"{', ...' if len(stale) > 3 else ''}), which the new index does not list",
            stacklevel=3,
        )


def readable_file_mode() -> int:
    """The mode a plain new file gets here (0666 less the umask), for files a library made private."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


class StateDictReader:
    """A state dict in memory as a `TensorReader` (its pieces are views of the state's tensors)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def read(self, requests: Mapping[K, TensorRequest]) -> Iterator[tuple[K, tuple, torch.Tensor]]:
        for key, request in requests.items():
            tensor = self.state[request.name]
            whole = tuple((0, n) for n in tensor.shape)
            source, target = overlap_indices(whole, request_box(request, tensor.shape))
            yield key, target, tensor.detach()[source]
