"""Convert between training checkpoints and the Hugging Face hub layout of Qwen3-Next, streaming.

    python launch/convert_hf.py to-hf runs/80b/checkpoints/step_1000 hf/step_1000   # or a run dir: latest
    python launch/convert_hf.py from-hf Qwen3-Next-80B-A3B-Base init/80b             # then:
    torchrun ... launch/pretrain.py conf=80b_a3b checkpoint.init_from=init/80b

`to-hf` reads a checkpoint of launch/pretrain.py (native, with or without expert or tensor
parallelism, or its universal form `step_N_universal`) through parallel/checkpoint_files.py, and
writes config.json + safetensors files that `transformers.Qwen3NextForCausalLM.from_pretrained`
loads (one key per expert; bf16 unless --dtype). The aux-loss-free selection biases, if the run
trained them, have no place in that format: they are left out with a warning (routing then differs).
`from-hf` writes initial weights for training: safetensors files in the model's own names (experts
fused) with model.safetensors.index.json, and `model.yaml` (its config, to compare against the run's
`model` settings). MTP weights the hub files lack are left to the trainer's seeded init.

Both directions write one output file at a time (`--max-shard-size`, default 4GiB), reading only
what that file needs, input file by input file: peak host memory is about one output file's tensors
plus the pages of the input file being read (mapped, and dropped before the next), never the whole
model (tests/distributed/test_convert_streaming.py measures it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from model.hf import OUR_CONFIG, WeightFiles, check_weights, write_hub_files
from model.tensor_files import (
    SHARD_BYTES,
    OutputTensor,
    TensorRequest,
    model_shapes,
    write_safetensors_files,
    write_text_atomically,
)
from parallel.checkpoint_files import EXPERT_FILE, MODULE_FILE, CheckpointFiles
from train.checkpoint import checkpoint_root, complete_checkpoints, first_undamaged, model_config_of
from train.checkpoint_integrity import verify_manifest

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """Bytes from "4000000", "500MB", "4GB" (powers of 1000) or "4GiB" (powers of 1024)."""
    match = SIZE.match(text)
    if match is None or (match.group(2) or "").upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or e.g. 500MB, 4GB, 4GiB)")
    size = int(float(match.group(1)) * UNITS[(match.group(2) or "").upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return size


def say(text: str) -> None:
    print(f"convert_hf.py: {text}", file=sys.stderr, flush=True)


def exported(name: str) -> bool:
    """The files of a checkpoint that to-hf reads: the weights and the config, not the optimizer
    state or the ranks' loader states (an export may be run on a copy of just these)."""
    return name == "config.yaml" or bool(MODULE_FILE.match(name) or EXPERT_FILE.match(name))


def damage_to_export(checkpoint: Path) -> list[str]:
    """What is wrong with the files to-hf reads, against the checkpoint's manifest: an export of
    flipped bytes would load in transformers and be wrong. None to check: a universal checkpoint
    (made from a checked step_N), or one saved before manifests (said in a warning)."""
    if checkpoint.name.endswith("_universal"):
        return []
    verdict = verify_manifest(checkpoint, only=exported)
    if not verdict.has_manifest:
        say(
            f"WARNING: {checkpoint} has no manifest.json (saved by an older version): exporting it unverified"
        )
    elif verdict.intact:
        say(f"checked the weights of {checkpoint} against its manifest ({verdict.seconds:.1f} s)")
    return verdict.problems


def resolve_checkpoint(path: Path, verify: bool = True) -> Path:
    """A step_N(_universal) directory as given, or the newest checkpoint of a run directory whose
    weights are intact (damaged newer ones skipped with a warning, as a resuming run does); with
    `verify`, the weights are checked against the manifest first (`damage_to_export`)."""
    if (path / "mp_rank_00_model_states.pt").exists():
        problems = damage_to_export(path) if verify else []
        if problems:
            listed = "\n  ".join(problems)
            raise SystemExit(f"convert_hf.py: {path} is damaged, not exporting it:\n  {listed}")
        return path
    newest_first = [found for _, found in reversed(complete_checkpoints(checkpoint_root(path)))]
    if not newest_first:
        raise SystemExit(
            f"convert_hf.py: {path} is neither a checkpoint (step_N/) nor a run dir with checkpoints"
        )
    found, _ = first_undamaged(newest_first, damage_to_export if verify else lambda _: [], say)
    if found is None:
        raise SystemExit(f"convert_hf.py: no checkpoint in {checkpoint_root(path)} has intact weights")
    return found


def report(name: str, nbytes: int) -> None:
    print(f"convert_hf.py: wrote {name} ({nbytes / 1e6:,.1f} MB)", flush=True)


def to_hf(
    checkpoint: Path,
    out_dir: Path,
    dtype: torch.dtype,
    max_shard_bytes: int = SHARD_BYTES,
    verify: bool = True,
) -> None:
    checkpoint = resolve_checkpoint(checkpoint, verify)
    config = model_config_of(checkpoint)
    files = CheckpointFiles(checkpoint, config)
    expected = model_shapes(config)
    biases = sorted(name for name in files.names() if name.endswith(".expert_bias"))
    if biases:
        print(
            f"convert_hf.py: warning: {len(biases)} aux-loss-free expert selection biases are not part of "
            "the HF format and are left out; the exported model routes without them",
            file=sys.stderr,
        )
    unexpected = sorted(files.names() - set(expected) - set(biases))
    missing = [name for name in expected if name not in files.names()]
    if unexpected or missing:
        raise SystemExit(
            f"convert_hf.py: {checkpoint} does not hold the model of its config.yaml: "
            f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
        )
    write_hub_files(files, expected, config, out_dir, dtype, max_shard_bytes, on_file=report)
    print(f"convert_hf.py: {checkpoint} -> {out_dir} ({len(expected)} tensors, {dtype})")


def from_hf(hf_dir: Path, out_dir: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    files = WeightFiles(hf_dir)
    config = files.model_config()
    expected = model_shapes(config)
    missing = check_weights(files, expected)  # raises unless only MTP weights are missing
    if missing:
        print(
            f"convert_hf.py: {hf_dir} has no weights for {len(missing)} MTP tensors "
            f"(e.g. {missing[0]}); training starts them from its seeded init",
            file=sys.stderr,
        )
    outputs = [
        OutputTensor(name, TensorRequest(name), tuple(shape), files.dtype(name))
        for name, shape in expected.items()
        if name not in missing
    ]
    write_safetensors_files(files, outputs, out_dir, max_shard_bytes, on_file=report)
    write_text_atomically(out_dir / OUR_CONFIG, OmegaConf.to_yaml(OmegaConf.structured(config)))
    print(f"convert_hf.py: {hf_dir} -> {out_dir}; train from it with checkpoint.init_from={out_dir}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    size_help = "the most bytes per output file, e.g. 4GB, 500MB, 4GiB or a number (default 4GiB)"
    to = sub.add_parser("to-hf", help="training checkpoint -> HF hub layout")
    to.add_argument("checkpoint", type=Path)
    to.add_argument("out_dir", type=Path)
    to.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    to.add_argument("--max-shard-size", type=parse_size, default=SHARD_BYTES, help=size_help)
    to.add_argument(
        "--no-verify", action="store_true", help="skip checking the weights against the checkpoint's manifest"
    )
    frm = sub.add_parser("from-hf", help="HF hub layout -> initial weights for checkpoint.init_from")
    frm.add_argument("hf_dir", type=Path)
    frm.add_argument("out_checkpoint", type=Path)
    frm.add_argument("--max-shard-size", type=parse_size, default=SHARD_BYTES, help=size_help)
    args = parser.parse_args(argv)
    source, target = (
        (args.checkpoint, args.out_dir) if args.command == "to-hf" else (args.hf_dir, args.out_checkpoint)
    )
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        parser.error(
            f"{args.command} would write over what it reads ({target}): give another output directory"
        )
    try:
        if args.command == "to-hf":
            to_hf(args.checkpoint, args.out_dir, DTYPES[args.dtype], args.max_shard_size, not args.no_verify)
        else:
            from_hf(args.hf_dir, args.out_checkpoint, args.max_shard_size)
    except FileExistsError as error:  # a model.safetensors where the files go (write_safetensors_files)
        raise SystemExit(f"convert_hf.py: {error}") from None


if __name__ == "__main__":
    main()
