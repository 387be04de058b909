"""Where a profiled training step's GPU time goes, by op family.

torch.profiler attaches a GPU kernel to the CPU op that launched it. Each kernel is put into one
family by that op and the kernel's name, or by its name alone when no op launched it (a Triton kernel
called from Python outside any torch op, such as model/ops/adamw.py's):
- routed experts: `aten::_grouped_mm` (the experts' GEMMs);
- LM head + CE: GEMMs with the vocabulary in a shape (the head's forward and both gradients), or one
  of the vocabulary parts the weight gradient is summed in (model/ops/cross_entropy.py);
- dense GEMMs: the other GEMMs (DeltaNet and attention projections, router, shared expert, MTP fc);
- DeltaNet: fla's Gated DeltaNet kernels and the short convolution;
- attention: flash / varlen attention kernels;
- routing, permute, combine: sorts, gathers, scatters, index ops (tokens to experts and back);
- norms / elementwise: Triton kernels torch.compile generated (fused norms, gates, SwiGLU, RoPE,
  casts, residual adds), the CE's softmax and its gradient (model/ops/cross_entropy.py's kernel),
  model/ops/casting.py's (gradients into their fp32 buffers, the LM head's gradient scaling) and
  eager elementwise and reduction kernels;
- optimizer: everything under the optimizer step (parallel/engine.py marks it for the profiler), and
  model/ops/adamw.py's kernel;
- communication: NCCL; copies: memcpy and memset; other: the rest, listed by name in the table.
What the CE's softmax costs therefore lands in norms / elementwise, not in LM head + CE.
`largest_kernels` lists the kernels of most time with the op that launched each and the nearest
non-aten op around it (an autograd Function, a compiled region): where a family's time comes from.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from model.ops.cross_entropy import weight_gradient_rows
from parallel.engine import OPTIMIZER_STEP

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}

KERNEL_FAMILIES = [  # (family, pattern on the kernel's name), first match wins
    ("optimizer", re.compile(r"^adamw_kernel")),
    ("communication", re.compile(r"nccl", re.I)),
    ("copies", re.compile(r"memcpy|memset", re.I)),
    (
        "DeltaNet",
        re.compile(
            r"chunk_|solve_tril|wy_|_w_u|kkt|l2norm|fused_recurrent|gated_delta|delta_rule|causal_conv"
            r"|merge_16x16|chunk_local_cumsum",
            re.I,
        ),
    ),
    ("attention", re.compile(r"flash|fmha|attention|varlen", re.I)),
    ("routing, permute, combine", re.compile(r"sort|scatter|gather|index|cumsum|topk|bincount", re.I)),
    (
        "norms / elementwise",
        re.compile(
            r"^triton_|elementwise|reduce_kernel|vectorized|unrolled|^add_into_fp32|^scale_kernel"
            r"|^loss_and_grad_logits",
            re.I,
        ),
    ),
]
FAMILY_ORDER = [
    "routed experts",
    "dense GEMMs",
    "LM head + CE",
    "DeltaNet",
    "attention",
    "routing, permute, combine",
    "norms / elementwise",
    "optimizer",
    "communication",
    "copies",
    "other",
]


@dataclass
class Family:
    name: str
    us: float = 0.0
    kernels: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, kernel: str, us: float) -> None:
        self.us += us
        self.kernels[kernel] += us

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.kernels.items(), key=lambda item: -item[1])[:n]


def family_of(op_name: str, shapes, kernel_name: str, under_optimizer: bool, vocab_size: int) -> str:
    """`vocab_size`: the LM head's rows on this rank (the vocabulary, or its tensor-parallel shard)."""
    if under_optimizer:
        return "optimizer"
    if op_name == "aten::_grouped_mm":
        return "routed experts"
    if op_name in GEMM_OPS:
        flat = {d for shape in shapes or [] if isinstance(shape, list | tuple) for d in shape}
        vocab_rows = {vocab_size, *weight_gradient_rows(vocab_size)}
        return "LM head + CE" if flat & vocab_rows else "dense GEMMs"
    for family, pattern in KERNEL_FAMILIES:
        if pattern.search(kernel_name):
            return family
    return "other"


def kernels_without_op(profile, attributed: dict[str, float]) -> dict[str, float]:
    """GPU time (us) by kernel name beyond what `attributed` (name -> us) charged to launching ops:
    the kernels no CPU op launched, from all the device events the profiler recorded."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = defaultdict(float)
    for event in profile.profiler.kineto_results.events():
        user_range = getattr(event, "is_user_annotation", lambda: False)()  # a range, not a kernel
        if event.device_type() == DeviceType.CUDA and not user_range:
            totals[event.name()] += event.duration_ns() / 1e3
    left = {name: us - attributed.get(name, 0.0) for name, us in totals.items()}
    return {name: us for name, us in left.items() if us > 1e-3}


def _under(event, range_name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == range_name:
            return True
        parent = parent.cpu_parent
    return False


NO_OP = "no op"  # what launched a kernel no CPU op launched


def charged_kernels(profile, vocab_size: int) -> list[tuple[str, float, str, int, str]]:
    """Every kernel of the profile charged once: (kernel, us, launched by, launches, family). A kernel
    an op launched is charged to that op ("op in its nearest non-aten op around it"), one row a
    launch; the time of kernels no op launched comes by name, one row a name, under `NO_OP` (their
    launches not counted)."""
    charged = []
    attributed: dict[str, float] = defaultdict(float)
    for event in profile.events():
        if not event.kernels:
            continue
        optimizer = _under(event, OPTIMIZER_STEP) or event.name == OPTIMIZER_STEP
        launched_by = f"{event.name} in {_context(event) or '-'}"
        for kernel in event.kernels:
            family = family_of(event.name, event.input_shapes, kernel.name, optimizer, vocab_size)
            charged.append((kernel.name, kernel.duration, launched_by, 1, family))
            attributed[kernel.name] += kernel.duration
    for kernel, us in kernels_without_op(profile, attributed).items():
        charged.append((kernel, us, NO_OP, 0, family_of("", None, kernel, False, vocab_size)))
    return charged


def op_families(profile, vocab_size: int, steps: int = 1) -> list[dict]:
    """Per family: ms a step, its share of all kernel time, and its three largest kernels, from a
    `torch.profiler.profile(record_shapes=True)` over `steps` steps; largest first in FAMILY_ORDER."""
    families = {name: Family(name) for name in FAMILY_ORDER}
    for kernel, us, _, _, family in charged_kernels(profile, vocab_size):
        families[family].add(kernel, us)
    total = sum(f.us for f in families.values()) or 1.0
    return [
        {
            "family": f.name,
            "ms": f.us / 1e3 / steps,
            "share": f.us / total,
            "top_kernels": [(name[:90], us / 1e3 / steps) for name, us in f.top()],
        }
        for f in families.values()
        if f.us > 0
    ]


def _context(event) -> str:
    """The nearest op around `event` that is not an aten op (an autograd Function, a compiled
    region, the optimizer step), or "" when there is none."""
    parent = event.cpu_parent
    while parent is not None and parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return "" if parent is None else parent.name


def largest_kernels(profile, vocab_size: int, steps: int = 1, n: int = 30) -> list[dict]:
    """The `n` (kernel, launching op, its context) triples of most GPU time, ms and launches a step,
    with the kernel's family: which op a kernel of the family table comes from."""
    rows: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for kernel, us, launched_by, launches, family in charged_kernels(profile, vocab_size):
        row = rows[(kernel, launched_by, family)]
        row[0] += us
        row[1] += launches
    ranked = sorted(rows.items(), key=lambda item: -item[1][0])[:n]
    return [
        {
            "kernel": kernel,
            "launched_by": by,
            "family": family,
            "ms": us / 1e3 / steps,
            "launches": count / steps,
        }
        for (kernel, by, family), (us, count) in ranked
    ]


def format_kernels(rows: list[dict]) -> str:
    lines = [f"{'ms/step':>8} {'launches':>8}  {'family':<14} {'kernel':<60} launched by (in)"]
    for row in rows:
        launches = f"{row['launches']:g}" if row["launched_by"] != NO_OP else "-"
        lines.append(
            f"{row['ms']:>8.3f} {launches:>8}  {row['family'][:14]:<14} {row['kernel'][:60]:<60} "
            f"{row['launched_by'][:70]}"
        )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    total = sum(r["ms"] for r in rows)
    lines = [f"{'op family':<28}{'ms/step':>10}{'share':>8}   largest kernels (ms)"]
    for row in rows:
        top = "; ".join(f"{name[:48]} {ms:.2f}" for name, ms in row["top_kernels"])
        lines.append(f"{row['family']:<28}{row['ms']:>10.2f}{row['share']:>8.1%}   {top}")
    lines.append(f"{'GPU kernel time':<28}{total:>10.2f}")
    return "\n".join(lines)
