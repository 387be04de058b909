"""train/safe_load.py: a checkpoint file whose pickle would run a command is refused, naming the
file, on every path that reads checkpoints: our loads, DeepSpeed's own `torch.load(weights_only=False)`
calls under `restricted_torch_load`, the workers of the conversion (fork or spawn), and the
ds_to_universal conversion that a change of layout runs (`convert_to_universal`). The payload only
creates a marker file, which must never appear."""

import json
import multiprocessing
import os
import shlex
from pathlib import Path

import pytest
import torch

from train.safe_load import (
    CheckpointUnpicklingError,
    load_file,
    restricted_process_pool,
    restricted_torch_load,
)


class CreatesMarker:
    """Unpickled without restriction, runs `touch MARKER` (as an attacker's `os.system(...)` would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def write_malicious(path: Path, marker: Path) -> Path:
    """A file shaped like DeepSpeed's (a "module" of tensors) with the payload next to the weights."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.ones(2)}, "payload": CreatesMarker(marker)}, path)
    return path


@pytest.fixture
def malicious(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return write_malicious(tmp_path / "mp_rank_00_model_states.pt", marker), marker


def load_as_deepspeed_does(path: str):
    """DeepSpeed 0.19.8's call (e.g. ds_to_universal, universal_checkpoint.load_hp_checkpoint_state)."""
    return torch.load(path, map_location=torch.device("cpu"), weights_only=False)


def test_the_payload_runs_under_an_unrestricted_load(malicious):
    path, marker = malicious
    load_as_deepspeed_does(str(path))
    assert marker.exists(), "the test's payload must be live for the refusals below to mean anything"


def test_load_file_refuses_the_file_and_names_it(malicious):
    path, marker = malicious
    with pytest.raises(CheckpointUnpicklingError, match=r"it pickles posix\.system") as refused:
        load_file(path)
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_restricted_torch_load_overrides_weights_only_false_and_is_undone(malicious):
    path, marker = malicious
    original = torch.load
    with pytest.raises(CheckpointUnpicklingError) as refused, restricted_torch_load():
        load_as_deepspeed_does(str(path))
    assert str(path) in str(refused.value)
    assert not marker.exists()
    assert torch.load is original, "the restriction ends with the context, even on an error"


def test_deepspeeds_own_universal_load_is_restricted(tmp_path):
    """A real DeepSpeed call site: the optimizer's global state of a universal checkpoint."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    marker = tmp_path / "MARKER"
    path = write_malicious(tmp_path / "zero" / "optimizer_state.pt", marker)
    with pytest.raises(CheckpointUnpicklingError) as refused, restricted_torch_load():
        ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir(object(), "groups", str(tmp_path))
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_deepspeeds_classes_still_load_under_the_restriction(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}
    state["mapping"] = fragment_address(numel=4, start=2)
    torch.save(state, tmp_path / "optim_states.pt")
    with restricted_torch_load():
        loaded = load_as_deepspeed_does(str(tmp_path / "optim_states.pt"))
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["mapping"] == state["mapping"] and loaded["loss_scaler"].cur_scale == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_the_conversions_workers_are_restricted_whichever_start_method(malicious, start_method):
    """This process is not restricted: the workers must restrict themselves, forked or spawned."""
    path, marker = malicious
    context = multiprocessing.get_context(start_method)
    with restricted_process_pool(max_workers=1, mp_context=context) as pool:
        future = pool.submit(load_as_deepspeed_does, str(path))
        with pytest.raises(CheckpointUnpicklingError) as refused:
            future.result(timeout=120)
    assert str(path) in str(refused.value)
    assert not marker.exists()


@pytest.mark.slow
def test_the_universal_conversion_refuses_the_file_and_names_it(tmp_path):
    """`convert_to_universal` (what a resume on another layout runs): ds_to_universal reads the
    optimizer states first, here the malicious file."""
    from train.checkpoint import convert_to_universal

    checkpoint = tmp_path / "checkpoints" / "step_2"
    marker = tmp_path / "MARKER"
    path = write_malicious(checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 2, "saved_at": "now"}))
    with pytest.raises(CheckpointUnpicklingError) as refused:
        convert_to_universal(checkpoint)
    assert str(path) in str(refused.value) and "posix.system" in str(refused.value)
    assert not marker.exists()
    assert not (tmp_path / "checkpoints" / "step_2_universal").exists()
