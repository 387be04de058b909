"""Three small experiments that test the design's claims on one GPU (README "What the design buys").

    python launch/prepare_data.py --demo-mixed        # the four-domain corpus, data/mixed/{train,eval}
    python launch/experiments.py run                   # the four arms below, conf=experiments each
    python launch/experiments.py throughput            # hybrid vs all-attention tokens/s, 4k and 32k
    python launch/experiments.py report                # docs/experiments/*.png and results.md

Every arm is `launch/pretrain.py conf=experiments` (a 512-wide hybrid MoE, 50.3M training tokens,
evaluated by domain every 96 steps) with the same data order and seed; they differ in one setting:

    base             3:1 Gated DeltaNet / gated attention, global-batch load balancing, no MTP
    micro_batch_lbl  loss.lb_scope=micro_batch: each micro-batch balanced alone        (experiment a)
    all_attention    every layer gated attention, 8 heads instead of 4 so that the
                     parameter count matches (375.0M vs 375.1M)                        (experiment b)
    mtp              one MTP depth, loss.mtp_weight 0.3                                (experiment c)

The preset has no MTP layer, so (c)'s "off" arm is `base`: the same trunk as `loss.mtp_weight=0`
would train (no gradient reaches it from the MTP head; the initial weights are seeded by name), without
the MTP layer's forward, a third of the FLOPs at this width.

`run` starts `--parallel` arms at a time on the one GPU (a 512-wide model leaves most of an H200
idle, so two or four share it well) and, with `--time-limit`, stops them with SIGTERM when it runs
out: each saves a checkpoint and the next `run` resumes it. Each arm's console goes to
`<runs>/<arm>/console.log`; extra arguments are Hydra overrides given to every arm (e.g.
logging.wandb.mode=disabled). `report` reads the arms' metrics.jsonl and the throughput JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train.plots for the report
ARMS = {
    "base": [],
    "micro_batch_lbl": ["loss.lb_scope=micro_batch"],
    "all_attention": ["model.full_attention_interval=1", "model.num_attention_heads=8"],
    "mtp": ["model.mtp_num_layers=1"],
}
DOMAINS = ("python", "c", "man", "docs")
THROUGHPUT = {4096: 2, 32768: 1}  # sequence length -> rows a step (8k and 32k tokens)


def arm_command(arm: str, runs: Path, extra: list[str]) -> list[str]:
    pretrain = [sys.executable, str(REPO / "launch" / "pretrain.py"), "conf=experiments"]
    return [*pretrain, f"run.dir={runs / arm}", *ARMS[arm], *extra]


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(starting)"
    return next((line for line in reversed(lines) if line.startswith(("step", "eval", "done"))), "(starting)")


def run_arms(arms: list[str], runs: Path, parallel: int, time_limit: float | None, extra: list[str]) -> int:
    """Run the arms, `parallel` at a time; SIGTERM them all at the time limit (they checkpoint)."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    waiting, running, failed = list(arms), {}, []
    reported = time.monotonic()
    while waiting or running:
        while waiting and len(running) < parallel and (deadline is None or time.monotonic() < deadline):
            arm = waiting.pop(0)
            (runs / arm).mkdir(parents=True, exist_ok=True)
            log = open(runs / arm / "console.log", "a")  # noqa: SIM115 (closed when the arm ends)
            process = subprocess.Popen(
                arm_command(arm, runs, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
            running[arm] = (process, log)
            print(f"started {arm}: {' '.join(ARMS[arm]) or '(the preset)'}", flush=True)
        if deadline is not None and time.monotonic() >= deadline:
            print("time limit: stopping the arms (each saves a checkpoint; rerun to resume)", flush=True)
            for process, _ in running.values():
                process.send_signal(signal.SIGTERM)
            deadline = math.inf  # signalled once; wait for them below
            waiting.clear()
        time.sleep(5)
        report_now = time.monotonic() - reported >= 60
        reported = time.monotonic() if report_now else reported
        for arm, (process, log) in list(running.items()):
            if report_now:
                print(f"  {arm}: {last_line(runs / arm / 'console.log')}", flush=True)
            if process.poll() is not None:
                log.close()
                del running[arm]
                if process.returncode:
                    failed.append(arm)
                print(f"{arm} exited with {process.returncode}", flush=True)
    return 1 if failed else 0


def measure_throughput(out: Path, extra: list[str]) -> int:
    """tokens/s of the hybrid and the all-attention arm at each THROUGHPUT length (bench layout)."""
    results = {}
    for arm in ("base", "all_attention"):
        for seq, rows in THROUGHPUT.items():
            target = out.with_name(f".{arm}-{seq}.json")
            command = [
                sys.executable, str(REPO / "launch" / "bench.py"), "layout", "--preset", "experiments",
                "--seq", str(seq), "--micro-batch", str(rows), "--out", str(target), *ARMS[arm], *extra,
            ]  # fmt: skip
            print(" ".join(command[1:]), flush=True)
            if subprocess.run(command, cwd=REPO).returncode:
                return 1
            results[f"{arm}@{seq}"] = json.loads(target.read_text())
            target.unlink()
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# report


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], float(row[key])) for row in rows if isinstance(row.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def final(rows: list[dict], key: str) -> float:
    values = series(rows, key)[1]
    return values[-1] if values else math.nan


def mean_of_last(rows: list[dict], key: str, steps: int = 50) -> float:
    values = series(rows, key)[1][-steps:]
    return sum(values) / len(values) if values else math.nan


def plot_panels(path: Path, title: str, panels: list[tuple[str, dict[str, tuple[list, list]]]]) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (ylabel, curves) in zip(axes, panels, strict=True):
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, "o-" if len(steps) < 40 else "-", label=label, markersize=3, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_last_routing(run_dir: Path, path: Path) -> bool:
    """The arm's last evaluation by domain as train/plots.py draws it (domain_routing.png)."""
    import numpy as np

    from train.plots import DomainRouting, domain_routing_figure

    source = run_dir / "domain_routing.jsonl"
    if not source.exists():
        return False
    last = json.loads(source.read_text().splitlines()[-1])
    counts = np.array(last["counts"], dtype=np.float64)
    figure = domain_routing_figure(
        DomainRouting(
            last["step"], tuple(last["domains"]), tuple(last["tokens"]), counts, tuple(last["layers"])
        )
    )
    figure.savefig(path, dpi=100)
    return True


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


COMMANDS = """    python launch/prepare_data.py --demo-mixed
    python launch/experiments.py run
    python launch/experiments.py throughput
    python launch/experiments.py report"""


def report(runs: Path, throughput: Path, out: Path, note: str = "") -> int:
    metrics = {arm: read_metrics(runs / arm) for arm in ARMS}
    missing = [arm for arm, rows in metrics.items() if not rows]
    if missing:
        print(f"no metrics.jsonl yet for {', '.join(missing)} under {runs}; reporting the others")
    sections = []

    def eval_curves(arms: tuple[str, ...], key: str = "eval_lm_loss") -> dict:
        return {arm: series(metrics[arm], key) for arm in arms}

    # (a) load-balancing scope
    arms = ("base", "micro_batch_lbl")
    plot_panels(
        out / "lbl_scope.png",
        "(a) load-balancing loss over the global batch vs each micro-batch",
        [
            ("held-out lm loss", eval_curves(arms)),
            ("routing KL by domain (nats)", eval_curves(arms, "eval_routing_kl")),
        ],
    )
    rows = []
    for arm in arms:
        m = metrics[arm]
        domains = [f"{final(m, f'eval_lm_loss/{d}'):.4f}" for d in DOMAINS]
        load = mean_of_last(m, "expert_load_max_over_mean")
        rows.append([arm, f"{final(m, 'eval_lm_loss'):.4f}", f"{final(m, 'eval_ppl'):.2f}", *domains,
                     f"{final(m, 'eval_routing_kl'):.4f}", f"{load:.2f}"])  # fmt: skip
    header = [
        "arm",
        "eval lm loss",
        "eval ppl",
        *(f"lm {d}" for d in DOMAINS),
        "routing KL",
        "train load max/mean",
    ]
    routing = [
        f"![](routing_{arm}.png)" for arm in arms if plot_last_routing(runs / arm, out / f"routing_{arm}.png")
    ]
    text = "## (a) lb_scope=global vs micro_batch\n\n![](lbl_scope.png)\n\n" + table(header, rows)
    sections.append(
        text + "\n\nExpert routing by held-out domain at the last evaluation:\n\n" + "\n".join(routing)
    )

    # (b) hybrid vs all-attention
    arms = ("base", "all_attention")
    plot_panels(out / "hybrid.png", "(b) 3:1 hybrid vs all gated attention, matched parameters",
                [("held-out lm loss", eval_curves(arms))])  # fmt: skip
    speed = json.loads(throughput.read_text()) if throughput.exists() else {}
    rows = []
    for arm in arms:
        rates = [speed.get(f"{arm}@{seq}", {}).get("tokens_per_s", math.nan) for seq in THROUGHPUT]
        rows.append([arm, f"{final(metrics[arm], 'eval_lm_loss'):.4f}", *(f"{rate:,.0f}" for rate in rates)])
    shapes = [f"tokens/s, {rows_} x {seq} a step (bench)" for seq, rows_ in THROUGHPUT.items()]
    sections.append(
        "## (b) hybrid vs all-attention\n\n![](hybrid.png)\n\n"
        + table(["arm", "eval lm loss", *shapes], rows)
    )

    # (c) MTP on vs off, compared at the last evaluation both arms reached
    arms = ("mtp", "base")
    plot_panels(
        out / "mtp.png",
        "(c) multi-token prediction on vs off",
        [
            ("held-out lm loss (next token)", eval_curves(arms)),
            ("MTP draft acceptance", eval_curves(("mtp",), "eval_mtp_accept")),
        ],
    )
    evaluated = [set(series(metrics[arm], "eval_lm_loss")[0]) for arm in arms]
    step = max(set.intersection(*evaluated), default=0)
    rows = []
    for arm in arms:
        at_step = {row["step"]: row for row in metrics[arm]}.get(step, {})
        accept = at_step.get("eval_mtp_accept")
        accept = "- (no MTP head)" if accept is None else f"{accept:.3f}"
        rows.append([arm, str(step), f"{at_step.get('eval_lm_loss', math.nan):.4f}", accept])
    header = ["arm", "step", "eval lm loss", "eval MTP accept"]
    sections.append("## (c) MTP on vs off\n\n![](mtp.png)\n\n" + table(header, rows))

    steps = {arm: (rows[-1]["step"] if rows else 0) for arm, rows in metrics.items()}
    tokens = {arm: (rows[-1].get("tokens", 0) if rows else 0) for arm, rows in metrics.items()}
    intro = f"Reproduce with\n\n{COMMANDS}\n\n{note}\n\n" if note else f"Reproduce with\n\n{COMMANDS}\n\n"
    head = (
        "# Experiment results (generated by `launch/experiments.py report`)\n\n"
        + intro
        + table(
            ["arm", "overrides", "steps", "training tokens"],
            [[arm, " ".join(ARMS[arm]) or "-", str(steps[arm]), f"{tokens[arm]:,}"] for arm in ARMS],
        )
    )
    (out / "results.md").write_text("\n\n".join([head, *sections]) + "\n")
    print(f"wrote {out / 'results.md'} and the plots beside it")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train the arms")
    run.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    run.add_argument("--parallel", type=int, default=2, help="arms at a time on the GPU")
    run.add_argument("--time-limit", type=float, default=None, help="seconds; then SIGTERM (they resume)")
    speed = sub.add_parser("throughput", help="tokens/s of hybrid and all-attention at 4k and 32k")
    rep = sub.add_parser("report", help="plots and tables from the arms' metrics")
    rep.add_argument("--out", type=Path, default=REPO / "docs" / "experiments")
    rep.add_argument("--note", default="", help="a paragraph under the title: the GPU, the date, ...")
    for command in (run, speed, rep):
        command.add_argument("--runs", type=Path, default=REPO / "runs" / "experiments")
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":
        return run_arms(args.arms, args.runs, args.parallel, args.time_limit, extra)
    if args.command == "throughput":
        return measure_throughput(args.runs / "throughput.json", extra)
    return report(args.runs, args.runs / "throughput.json", args.out, args.note)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
