"""launch/pretrain.py's command line as a user meets it: help, unknown keys, errors printed once."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.gloo import torchrun

ROOT = Path(__file__).resolve().parents[2]


def pretrain(*arguments: str, launcher: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    command = [*launcher, str(ROOT / "launch" / "pretrain.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_help_names_the_presets_and_common_settings_at_once():
    started = time.monotonic()
    result = pretrain("--help")
    assert result.returncode == 0 and time.monotonic() - started < 3
    for preset in ("tiny", "small", "80b_a3b"):
        assert f"  {preset} " in result.stdout
    for text in ("trainer.max_steps", "trainer.dry_run=true", "torchrun", "sbatch", "train/config.py"):
        assert text in result.stdout
    assert "hydra" not in result.stdout.lower().replace("hydra-help", "").replace("hydra overrides", "")


def test_the_closest_key_suggested_is_one_that_takes_a_value():
    from train.config import check_override_keys, schema_keys

    groups = {key for key in schema_keys() if any(other.startswith(f"{key}.") for other in schema_keys())}
    for written in ("+trainer.foo=1", "+loggin=1", "data.eval=x", "logging.wandbb.mode=x"):
        with pytest.raises(ValueError, match="unknown setting") as caught:
            check_override_keys([written])
        suggested = str(caught.value).partition("(did you mean ")[2].partition("?)")[0]
        assert suggested not in groups, f"{written}: suggests the group {suggested}"


@pytest.mark.slow
@pytest.mark.parametrize("written", ["trainer.max_stepz=3", "+trainer.max_stepz=3", "++trainer.max_stepz=3"])
def test_an_unknown_key_is_refused_however_written_with_the_closest_key(written):
    result = pretrain("conf=tiny", "trainer.dry_run=true", written)
    assert result.returncode == 2
    assert "unknown setting 'trainer.max_stepz' (did you mean trainer.max_steps?)" in result.stderr
    assert result.stderr.count("pretrain.py:") == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_dry_run_leaves_no_run_directory(tmp_path):
    run_dir = tmp_path / "planned"
    result = pretrain("conf=tiny", "trainer.dry_run=true", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_shown_once_and_last():
    """torchrun follows a failed worker with its traceback and failure table: the message must be
    the table's root cause, at the end of the output, and nowhere else."""
    result = pretrain("conf=tiny", "data.streams=3", launcher=tuple(torchrun(2)))
    assert result.returncode != 0
    assert result.stderr.count("pretrain.py: ") == 1, result.stderr
    root_cause = result.stderr.rpartition("Root Cause")[2]
    assert "data.streams (3)" in root_cause, result.stderr


@pytest.mark.slow
def test_missing_data_is_reported_before_the_model_is_built(tmp_path):
    result = pretrain("conf=tiny", f"data.path={tmp_path / 'none'}", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "no such directory" in result.stderr and "prepare_data.py" in result.stderr
    assert "building the model" not in result.stdout


def composed(*overrides: str, preset: str = "tiny"):
    """The typed config launch/pretrain.py would build from these overrides of a preset."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("pretrain", overrides=[f"conf={preset}", *overrides]))


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("trainer.global_batch_size=0", ">= 1"),
        ("optim.lr=-1", "> 0"),
        ("data.streams=0", ">= 1"),
        ("data.num_workers=-1", ">= 0"),
        ("trainer.max_steps=-5", ">= 0"),
        ("optim.grad_clip=-1", ">= 0"),
        ("checkpoint.every=-1", ">= 0"),
        ("optim.beta2=1.0", "in [0, 1)"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key_and_the_range(override, allowed):
    from train.config import validate_layout

    key, value = override.split("=")
    with pytest.raises(ValueError) as caught:
        validate_layout(composed(override), 1)
    message = str(caught.value)
    assert message.startswith(f"{key}=") and float(message.split()[0].split("=")[1]) == float(value)
    assert message.endswith(f"out of range: it must be {allowed}")


@pytest.mark.slow
def test_a_run_dir_naming_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    result = pretrain("conf=tiny", f"run.dir={tmp_path / 'taken'}")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"pretrain.py: run.dir={tmp_path / 'taken'} is a file; run.dir names the run's directory"
    )
