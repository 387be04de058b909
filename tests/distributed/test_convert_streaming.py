"""launch/convert_hf.py on a real checkpoint of launch/pretrain.py: right weights, bounded memory.

The trainer writes the initial weights (`trainer.max_steps=0`) of a model of about 260 MB on 2
processes with AutoEP (`parallel.expert=2`: the non-expert tensors in mp_rank_00, one file per
expert), 5 MoE layers of 64 experts. `to-hf` exports it with 16 MB output files, `from-hf` reads that
export back into our fused layout. Each conversion runs in its own process, which measures its peak
resident memory above its own baseline after its imports (Linux's VmHWM, reset through
/proc/self/clear_refs). It must stay below the largest output file written, plus one MoE
layer's experts, plus MARGIN for the interpreter's own allocations during the conversion (plan,
index, one piece, allocator slack) - far below the 260 MB a whole-model conversion would hold.
The exported weights, read back with plain `safetensors.torch.load_file`, are compared with the
weights the checkpoint must hold: the model's seeded initialisation (`model.init.init_weights`, the
1-process model; the trainer saved before any step), computed independently of any checkpoint reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.hf import PER_EXPERT, model_config_from_hf
from model.tensor_files import FUSED_EXPERTS
from tests.distributed.test_training import REPO, environment, overrides, pretrain, write_corpus
from train.checkpoint import model_config_of

MiB = 2**20
MARGIN = 16 * MiB
MAX_FILE = "16MB"
BIG = {
    "model.hidden_size": 256,
    "model.num_experts": 64,
    "model.moe_intermediate_size": 256,
    "model.shared_expert_intermediate_size": 512,
    "trainer.max_steps": 0,
    "parallel.expert": 2,
}
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import omegaconf, safetensors.torch  # imported by the conversion on its way: loaded before the baseline
import model.qwen3_next, parallel.checkpoint_files, parallel.tensor, parallel.vocab
from launch import convert_hf

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident size
except OSError:
    print(json.dumps({"reset": False}))
    sys.exit(0)
baseline = status("VmRSS")
convert_hf.main(sys.argv[2:])
print(json.dumps({"reset": True, "baseline": baseline, "peak": status("VmHWM")}))
"""

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="measures memory via Linux /proc"
)


def convert(*args: str) -> tuple[dict, str]:
    """Runs convert_hf.py's main in a fresh process; returns its memory measurement and stderr."""
    command = [sys.executable, "-c", DRIVER, str(REPO), *args]
    result = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (
        f"convert_hf.py {args[0]} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    )
    measurement = json.loads(result.stdout.strip().splitlines()[-1])
    if not measurement["reset"]:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    return measurement, result.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    run_dir = root / "run"
    pretrain(2, overrides(write_corpus(root / "corpus"), run_dir, **BIG))
    return run_dir / "checkpoints" / "step_0"


@pytest.fixture(scope="module")
def reference(checkpoint) -> dict[str, torch.Tensor]:
    """What the step-0 checkpoint holds: the seeded initial weights, and zero selection biases."""
    from model.init import init_weights
    from model.qwen3_next import Qwen3NextForCausalLM

    config = model_config_of(checkpoint)
    model = Qwen3NextForCausalLM(config)
    init_weights(model, config, seed=0)
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub")
    measurement, stderr = convert(
        "to-hf", str(checkpoint), str(out), "--dtype", "fp32", "--max-shard-size", MAX_FILE
    )
    return out, measurement, stderr


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    measurement, _ = convert("from-hf", str(exported[0]), str(out), "--max-shard-size", MAX_FILE)
    return out, measurement


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        tensors.update(load_file(directory / file))
    assert tensors.keys() == index.keys()
    return tensors


def layer_experts_bytes(config, dtype_bytes: int = 4) -> int:
    """One MoE layer's experts: gate, up and down of every expert."""
    return 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size * dtype_bytes


def check_peak(measurement: dict, out_dir: Path, config, model_bytes: int) -> None:
    largest_file = max(f.stat().st_size for f in out_dir.glob("model-*.safetensors"))
    bound = largest_file + layer_experts_bytes(config) + MARGIN
    assert bound < model_bytes / 2, "the model should be big enough for the bound to matter"
    used = measurement["peak"] - measurement["baseline"]
    print(f"{out_dir.name}: peak {used / MiB:.1f} MiB above baseline; bound {bound / MiB:.1f} MiB")
    assert used < bound, f"peak {used / MiB:.1f} MiB above baseline, bound {bound / MiB:.1f} MiB"


def test_to_hf_writes_the_checkpoints_weights_in_the_hub_layout(checkpoint, reference, exported):
    out, _, stderr = exported
    assert "5 aux-loss-free expert selection biases" in stderr
    expected = {name: t for name, t in reference.items() if not name.endswith(".expert_bias")}
    hub = read_all(out)
    covered = set()
    for key, tensor in hub.items():
        match = PER_EXPERT.match(key)
        if match is None:
            name, value = key, expected[key]
        else:
            j, proj, inter = int(match["expert"]), match["proj"], BIG["model.moe_intermediate_size"]
            name = f"{match['prefix']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
            value = {"gate_proj": expected[name][j, :inter], "up_proj": expected[name][j, inter:]}.get(
                proj, expected[name][j]
            )
        covered.add(name)
        assert torch.equal(tensor, value), key
    assert covered == expected.keys()
    assert any(FUSED_EXPERTS.match(name) for name in covered)
    config = model_config_of(checkpoint)
    assert model_config_from_hf(json.loads((out / "config.json").read_text())) == config


def test_to_hf_peak_memory_is_one_output_file_plus_one_layers_experts(checkpoint, reference, exported):
    out, measurement, _ = exported
    model_bytes = sum(t.nbytes for t in reference.values())
    check_peak(measurement, out, model_config_of(checkpoint), model_bytes)
    assert len(list(out.glob("model-*.safetensors"))) > 10


def test_from_hf_writes_our_fused_layout_within_the_same_bound(checkpoint, reference, imported):
    from omegaconf import OmegaConf

    from model.config import ModelConfig

    out, measurement = imported
    expected = {name: t for name, t in reference.items() if not name.endswith(".expert_bias")}
    ours = read_all(out)
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[name], expected[name]) for name in expected)
    saved = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(out / "model.yaml"))
    )
    config = model_config_of(checkpoint)
    assert saved == config
    check_peak(measurement, out, config, sum(t.nbytes for t in expected.values()))
