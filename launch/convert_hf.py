"""Convert between training checkpoints and the Hugging Face hub layout of Qwen3-Next.

    python launch/convert_hf.py to-hf runs/80b/checkpoints/step_1000 hf/step_1000   # or a run dir: latest
    python launch/convert_hf.py from-hf Qwen3-Next-80B-A3B-Base init/80b             # then:
    torchrun ... launch/pretrain.py conf=80b_a3b checkpoint.init_from=init/80b

`to-hf` reads a checkpoint of launch/pretrain.py (native, with or without expert parallelism, or its
universal form `step_N_universal`), maps DeepSpeed AutoEP's expert names back to the model's, and
writes config.json + safetensors that `transformers.Qwen3NextForCausalLM.from_pretrained` loads
(`model.hf.save_hf`; bf16 unless --dtype). The aux-loss-free selection biases, if the run trained
them, have no place in that format: they are left out with a warning (routing then differs).
`from-hf` writes initial weights for training: `model.safetensors` in the model's own names and
`model.yaml` (its config, to compare against the run's `model` settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from model.hf import load_hf, save_hf
from model.qwen3_next import Qwen3NextForCausalLM
from parallel.expert import consolidated_module_state
from train.checkpoint import checkpoint_root, complete_checkpoints, model_config_of

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
INIT_WEIGHTS, INIT_CONFIG = "model.safetensors", "model.yaml"


def resolve_checkpoint(path: Path) -> Path:
    """A step_N(_universal) directory as given, or the latest complete checkpoint of a run directory."""
    if (path / "mp_rank_00_model_states.pt").exists():
        return path
    found = complete_checkpoints(checkpoint_root(path))
    if not found:
        raise SystemExit(
            f"convert_hf.py: {path} is neither a checkpoint (step_N/) nor a run dir with checkpoints"
        )
    return found[-1][1]


def to_hf(checkpoint: Path, out_dir: Path, dtype: torch.dtype) -> None:
    checkpoint = resolve_checkpoint(checkpoint)
    config = model_config_of(checkpoint)
    state = consolidated_module_state(checkpoint)
    biases = [name for name in state if name.endswith(".expert_bias")]
    if biases:
        print(
            f"convert_hf.py: warning: {len(biases)} aux-loss-free expert selection biases are not part of "
            "the HF format and are left out; the exported model routes without them",
            file=sys.stderr,
        )
        state = {name: tensor for name, tensor in state.items() if name not in biases}
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    save_hf(model, out_dir, dtype=dtype)
    print(f"convert_hf.py: {checkpoint} -> {out_dir} ({len(state)} tensors, {dtype})")


def from_hf(hf_dir: Path, out_dir: Path) -> None:
    from safetensors.torch import save_file

    model = load_hf(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / INIT_WEIGHTS))
    (out_dir / INIT_CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.structured(model.config)))
    print(f"convert_hf.py: {hf_dir} -> {out_dir}; train from it with checkpoint.init_from={out_dir}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="training checkpoint -> HF hub layout")
    to.add_argument("checkpoint", type=Path)
    to.add_argument("out_dir", type=Path)
    to.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    frm = sub.add_parser("from-hf", help="HF hub layout -> initial weights for checkpoint.init_from")
    frm.add_argument("hf_dir", type=Path)
    frm.add_argument("out_checkpoint", type=Path)
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        to_hf(args.checkpoint, args.out_dir, DTYPES[args.dtype])
    else:
        from_hf(args.hf_dir, args.out_checkpoint)


if __name__ == "__main__":
    main()
