"""Streaming HF interop: `model.hf.WeightFiles` reads what `save_hf` and `convert_hf.py from-hf` write,
piece by piece and one file at a time; `parallel.checkpoint_files` reads DeepSpeed's layouts the same way.

The files here come from a tiny model saved with a small `max_shard_bytes`, so that it spans many
files and one layer's experts (even one expert's projections) fall in different files. Every request
kind is checked against slices of the model's own state dict.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref

import pytest
import torch

import model.hf as hf
import parallel.checkpoint_files as checkpoint_files
from launch.convert_hf import from_hf, parse_size
from model.hf import WeightFiles, load_hf, save_hf
from model.tensor_files import TensorRequest
from parallel.checkpoint_files import consolidated_module_state
from tests.conftest import tiny_config
from tests.unit.test_model import build

SMALL_FILES = 10_000  # bytes: the tiny model (454 kB in fp32) spans about 50 files
CONFIG = tiny_config(mtp_num_layers=1)
INTER = CONFIG.moe_intermediate_size
GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"
DOWN = "mtp.layers.0.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def model():
    return build(CONFIG, seed=3)


@pytest.fixture(scope="module")
def hub_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hub")
    save_hf(model, directory, max_shard_bytes=SMALL_FILES)
    return directory


@pytest.fixture(scope="module")
def fused_dir(hub_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fused")
    from_hf(hub_dir, directory, max_shard_bytes=SMALL_FILES)
    return directory


@pytest.fixture(params=["hub", "fused"])
def files(request, hub_dir, fused_dir):
    return WeightFiles(hub_dir if request.param == "hub" else fused_dir)


def assemble(files, requests):
    """The requested tensors, built from the pieces read() yields (each place filled exactly once)."""
    out, counts, pieces = {}, {}, []
    for key, index, piece in files.read(requests):
        request = requests[key]
        if key not in out:
            shape = list(files.shape(request.name))
            if request.experts is not None:
                shape[0] = len(request.experts)
            if request.rows is not None:
                shape[1] = len(range(shape[1])[request.rows])
            out[key] = torch.full(shape, float("nan"), dtype=piece.dtype)
            counts[key] = torch.zeros(shape, dtype=torch.int64)
        out[key][index] = piece
        counts[key][index] += 1
        pieces.append((key, index))
    for key, count in counts.items():
        assert (count == 1).all(), f"{key}: pieces overlap or leave gaps"
    return out, pieces


def test_files_span_many_files_and_split_a_layers_experts(hub_dir, fused_dir):
    hub_map = json.loads((hub_dir / hf.INDEX_FILE).read_text())["weight_map"]
    assert len(set(hub_map.values())) > 10
    layer_files = {file for key, file in hub_map.items() if key.startswith("model.layers.1.mlp.experts.")}
    assert len(layer_files) > 2
    fused_map = json.loads((fused_dir / hf.INDEX_FILE).read_text())["weight_map"]
    assert fused_map[GATE_UP] != fused_map[GATE_UP.replace("gate_up_proj", "down_proj")]


def test_names_shapes_and_config(files, model):
    state = model.state_dict()
    assert files.names() == set(state)
    for name, tensor in state.items():
        assert files.shape(name) == tensor.shape, name
        assert files.dtype(name) == tensor.dtype
    assert files.model_config() == CONFIG


REQUESTS = {
    "dense": TensorRequest("model.layers.3.self_attn.q_proj.weight"),
    "norm": TensorRequest("mtp.norm.weight"),
    "fused": TensorRequest(GATE_UP),
    "experts": TensorRequest(GATE_UP, experts=range(2, 5)),
    "gate": TensorRequest(GATE_UP, rows=slice(0, INTER)),
    "up": TensorRequest(GATE_UP, rows=slice(INTER, 2 * INTER)),
    "up_of_some": TensorRequest(GATE_UP, experts=range(5, 8), rows=slice(INTER, 2 * INTER)),
    "straddling_rows": TensorRequest(GATE_UP, experts=range(1, 2), rows=slice(INTER - 3, INTER + 5)),
    "down": TensorRequest(DOWN, experts=range(0, 3)),
    "down_rows": TensorRequest(DOWN, rows=slice(4, 9)),
}


def expected_slice(state, request):
    tensor = state[request.name]
    if request.experts is not None:
        tensor = tensor[request.experts.start : request.experts.stop]
    if request.rows is not None:
        tensor = tensor[:, request.rows]
    return tensor


def test_every_request_kind_equals_the_slice_of_the_state_dict(files, model):
    state = model.state_dict()
    got, pieces = assemble(files, REQUESTS)
    assert got.keys() == REQUESTS.keys()
    for key, request in REQUESTS.items():
        assert torch.equal(got[key], expected_slice(state, request)), key
    assert [index for key, index in pieces if key in ("dense", "norm")] == [(), ()]


def test_pieces_per_expert_part_from_the_hub_one_from_fused_keys(hub_dir, fused_dir):
    requests = {
        "gate": REQUESTS["gate"],
        "straddling_rows": REQUESTS["straddling_rows"],
        "fused": REQUESTS["fused"],
    }
    _, hub_pieces = assemble(WeightFiles(hub_dir), requests)
    count = lambda pieces, key: sum(k == key for k, _ in pieces)
    experts = CONFIG.num_experts
    assert (count(hub_pieces, "gate"), count(hub_pieces, "straddling_rows"), count(hub_pieces, "fused")) == (
        experts,
        2,  # the gate's last rows and the up's first
        2 * experts,
    )
    _, fused_pieces = assemble(WeightFiles(fused_dir), requests)
    assert [count(fused_pieces, key) for key in requests] == [1, 1, 1]


class TrackedHandle:
    """A safe_open handle that reports when it is entered, exited and garbage (the file stays mapped
    until the handle is garbage)."""

    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def __enter__(self):
        self.handle.__enter__()
        self.log.append(("open", id(self)))
        weakref.finalize(self, self.log.append, ("gone", id(self)))
        return self

    def __exit__(self, *exc):
        self.log.append(("close", id(self)))
        return self.handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@contextlib.contextmanager
def tracked_safe_open(monkeypatch):
    """Wraps model.hf.safe_open: yields the files opened, in order, and the most handles open (entered,
    not exited) and alive (not yet garbage) at once."""
    real, opened, log = hf.safe_open, [], []

    def tracking(path, *args, **kwargs):
        opened.append(str(path))
        return TrackedHandle(real(path, *args, **kwargs), log)

    monkeypatch.setattr(hf, "safe_open", tracking)
    most = {"open": 0, "alive": 0}
    yield opened, most
    current = {"open": set(), "alive": set()}
    for event, handle in log:
        if event == "open":
            current["open"].add(handle)
            current["alive"].add(handle)
        else:
            current["open" if event == "close" else "alive"].discard(handle)
        most.update({kind: max(most[kind], len(handles)) for kind, handles in current.items()})


def test_read_opens_each_file_once_and_one_at_a_time(files, model, monkeypatch):
    everything = {name: TensorRequest(name) for name in files.names()}
    with tracked_safe_open(monkeypatch) as (opened, most):
        got, _ = assemble(files, everything)
    stored_in = set(json.loads((files.directory / hf.INDEX_FILE).read_text())["weight_map"].values())
    assert sorted(opened) == sorted(str(files.directory / name) for name in stored_in)
    assert most == {"open": 1, "alive": 1}
    state = model.state_dict()
    assert all(torch.equal(got[name], state[name]) for name in state)


def test_bad_requests_are_refused_naming_the_name_and_directory(hub_dir):
    files = WeightFiles(hub_dir)
    with pytest.raises(KeyError, match=rf"model\.layers\.9\.mlp\.gate\.weight.*{hub_dir.name}"):
        list(files.read({"x": TensorRequest("model.layers.9.mlp.gate.weight")}))
    with pytest.raises(ValueError, match="fused expert tensors only"):
        list(files.read({"x": TensorRequest("model.norm.weight", experts=range(0, 1))}))
    with pytest.raises(ValueError, match="experts range"):
        list(files.read({"x": TensorRequest(GATE_UP, experts=range(6, 9))}))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        WeightFiles(hub_dir / "absent")


def test_load_hf_round_trips_through_many_files_in_either_layout(model, hub_dir, fused_dir):
    state = model.state_dict()
    for directory in (hub_dir, fused_dir):
        loaded = load_hf(directory).state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[name], state[name]) for name in state), directory


def test_save_hf_holds_one_output_file_at_a_time(model, tmp_path, monkeypatch):
    """The tensors of a written file are gone before the next file's are read."""
    from safetensors.torch import save_file

    alive, most = set(), [0]

    def tracking(tensors, path, metadata=None):
        for tensor in tensors.values():
            alive.add(id(tensor))
            weakref.finalize(tensor, alive.discard, id(tensor))
        most[0] = max(most[0], len(alive) / len(tensors))
        save_file(tensors, path, metadata)

    monkeypatch.setattr("safetensors.torch.save_file", tracking)
    save_hf(model, tmp_path, max_shard_bytes=SMALL_FILES)
    assert most[0] == 1, "a file's tensors outlive it"
    assert not list(tmp_path.glob("*.partial"))


def test_a_conversion_that_fails_midway_leaves_none_of_its_files(model, tmp_path, monkeypatch):
    """Disk full, a read error, Ctrl-C: the files written so far go too (they are only ever .partial)."""
    from safetensors.torch import save_file

    written = []

    def failing_on_the_fourth(tensors, path, metadata=None):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(path)
        save_file(tensors, path, metadata)

    monkeypatch.setattr("safetensors.torch.save_file", failing_on_the_fourth)
    with pytest.raises(OSError, match="No space left"):
        save_hf(model, tmp_path, max_shard_bytes=SMALL_FILES)
    assert len(written) == 3 and all(path.endswith(".partial") for path in written)
    assert not list(tmp_path.iterdir())


def test_an_export_over_an_earlier_one_leaves_only_its_own_weight_files(model, tmp_path):
    """An earlier export's files that the new index does not list go (another file count's
    model-*-of-M files would lie about); files no index listed stay."""
    save_hf(model, tmp_path, max_shard_bytes=SMALL_FILES)
    earlier = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    (tmp_path / "model-00009-of-00099.safetensors").write_bytes(b"not listed by any index")
    (tmp_path / "README.md").write_text("the user's own")
    removed = rf"removed {len(earlier)} weight file\(s\) of an earlier export"
    with pytest.warns(UserWarning, match=removed):
        save_hf(model, tmp_path)  # one file now: model-00001-of-00001, which the earlier index did not list
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    listed = set(index["weight_map"].values())
    assert listed == {"model-00001-of-00001.safetensors"} and len(earlier) > 1
    unlisted = "model-00009-of-00099.safetensors"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [*listed, "model.safetensors.index.json", "config.json", "README.md", unlisted]
    )
    reloaded = load_hf(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_an_export_beside_a_single_file_model_is_refused_before_anything_is_written(model, tmp_path):
    """transformers loads model.safetensors before any index: an export beside one would not be
    what loads."""
    (tmp_path / "model.safetensors").write_bytes(b"someone's model")
    with pytest.raises(FileExistsError, match=r"model\.safetensors exists: transformers would load it"):
        save_hf(model, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_conversion_into_its_own_input_is_refused_before_anything_is_written(hub_dir, capsys):
    from launch.convert_hf import main

    before = {path.name: path.stat().st_mtime_ns for path in hub_dir.iterdir()}
    with pytest.raises(SystemExit) as exit_:
        main(["from-hf", str(hub_dir), str(hub_dir / ".." / hub_dir.name)])
    assert exit_.value.code == 2 and "would write over what it reads" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in hub_dir.iterdir()} == before


# -- DeepSpeed checkpoints: the layouts parallel/checkpoint_files.py reads, written as the trainer would


def write_config(directory, config):
    from omegaconf import OmegaConf

    (directory / "config.yaml").write_text(OmegaConf.to_yaml({"model": OmegaConf.structured(config)}))


def autoep_names(state):
    """Our names -> AutoEP's for the non-expert tensors (parallel/expert.py's layout)."""
    renamed = {}
    for name, tensor in state.items():
        name = name.replace(".mlp.gate.", ".mlp.router.gate.").replace(
            ".mlp.shared_expert_gate.", ".mlp.shared_experts_gate."
        )
        renamed[name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")] = tensor
    return renamed


def split_experts(state):
    """Fused experts -> AutoEP's whole w1 / w3 [E, I, H] and w2 [E, H, I], keyed by block."""
    experts, rest = {}, {}
    for name, tensor in state.items():
        if name.endswith(".experts.gate_up_proj"):
            block = name.removesuffix(".experts.gate_up_proj")
            experts[block] = {"w1": tensor[:, :INTER], "w3": tensor[:, INTER:]}
        elif name.endswith(".experts.down_proj"):
            experts[name.removesuffix(".experts.down_proj")]["w2"] = tensor
        else:
            rest[name] = tensor
    return experts, rest


def write_autoep_checkpoint(directory, model, bias):
    experts, rest = split_experts(model.state_dict())
    module = {**autoep_names(rest), **bias}
    torch.save({"module": module, "global_steps": 3}, directory / "mp_rank_00_model_states.pt")
    for layer, (block, weights) in enumerate(experts.items()):
        for e in range(CONFIG.num_experts):
            tensors = {f"{block}.experts.{w}.{e}": weights[w][e].clone() for w in ("w1", "w3", "w2")}
            torch.save(tensors, directory / f"layer_{layer}_expert_{e}_mp_rank_{e // 4:02d}_model_states.pt")


def write_universal_checkpoint(directory, model, bias):
    experts, rest = split_experts(model.state_dict())
    params = autoep_names(rest)
    for block, weights in experts.items():
        params.update({f"{block}.experts.{w}": weights[w] for w in ("w1", "w3", "w2")})
    for name, tensor in params.items():
        (directory / "zero" / name).mkdir(parents=True)
        torch.save({"param": tensor.clone(), "cat_dim": 0}, directory / "zero" / name / "fp32.pt")
    torch.save({"module": bias}, directory / "mp_rank_00_model_states.pt")


def write_tensor_parallel_checkpoint(directory, model, bias):
    from parallel.tensor import TensorParallelPosition, apply_tensor_parallel

    for rank in range(2):
        shard = copy.deepcopy(model)
        apply_tensor_parallel(shard, TensorParallelPosition(2, rank))
        module = {name: t.clone() for name, t in shard.state_dict().items()}
        torch.save({"module": {**module, **bias}}, directory / f"mp_rank_{rank:02d}_model_states.pt")


@pytest.mark.parametrize(
    "write", [write_autoep_checkpoint, write_universal_checkpoint, write_tensor_parallel_checkpoint]
)
def test_checkpoint_files_read_every_deepspeed_layout_in_our_names(model, tmp_path, write, monkeypatch):
    bias = {"model.layers.0.mlp.expert_bias": torch.arange(8.0)}
    write(tmp_path, model, bias)
    write_config(tmp_path, CONFIG)
    loads, alive, most = [], set(), [0]
    real = checkpoint_files.load_lazily

    def tracking(path):  # a file stays mapped while any tensor of its load lives
        loaded = real(path)
        tensor = next(t for t in checkpoint_files.tensors_of(path, loaded).values() if torch.is_tensor(t))
        loads.append(path)
        alive.add(path)
        most[0] = max(most[0], len(alive))
        weakref.finalize(tensor, alive.discard, path)
        return loaded

    monkeypatch.setattr(checkpoint_files, "load_lazily", tracking)
    state = consolidated_module_state(tmp_path, CONFIG)
    expected = {**model.state_dict(), **bias}
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert most[0] == 1, "one checkpoint file mapped at a time"

    files, loads[:] = checkpoint_files.CheckpointFiles(tmp_path, CONFIG), []
    got, _ = assemble(files, REQUESTS)
    for key, request in REQUESTS.items():
        assert torch.equal(got[key], expected_slice(expected, request)), key
    assert len(loads) == len(set(loads)), "each file read once per read()"


def test_max_shard_size_parses_bytes_and_units():
    assert [parse_size(s) for s in ("1234", "4GB", "500MB", "4GiB", "1.5 KiB")] == [
        1234,
        4 * 10**9,
        500 * 10**6,
        4 * 2**30,
        1536,
    ]
    with pytest.raises(Exception, match="not a size"):
        parse_size("4 bananas")
