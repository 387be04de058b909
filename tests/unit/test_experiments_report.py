"""`launch/experiments.py report`: the tables hold the arms' own numbers, and (c) compares MTP on and
off at the last evaluation both arms reached."""

import json

import pytest

from launch.experiments import ARMS, DOMAINS, report


def write_metrics(run_dir, evals: dict[int, dict], last_step: int) -> None:
    run_dir.mkdir(parents=True)
    rows = [
        {"step": s, "loss": 5.0, "tokens": 1000 * s, "expert_load_max_over_mean": 1.5}
        for s in range(1, last_step + 1)
    ]
    for row in rows:
        row.update(evals.get(row["step"], {}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def evaluation(lm: float, kl: float, accept: float | None = None) -> dict:
    values = {"eval_lm_loss": lm, "eval_ppl": 2.718281828**lm, "eval_routing_kl": kl}
    values.update({f"eval_lm_loss/{d}": lm + i for i, d in enumerate(DOMAINS)})
    return values if accept is None else {**values, "eval_mtp_accept": accept}


@pytest.mark.parametrize("mtp_steps", [20, 12], ids=["mtp-complete", "mtp-stopped-early"])
def test_report_tables_hold_each_arms_numbers(tmp_path, mtp_steps):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for offset, arm in enumerate(("base", "micro_batch_lbl", "all_attention")):
        write_metrics(runs / arm, {10: evaluation(4.0 + offset, 0.1), 20: evaluation(3.0 + offset, 0.2)}, 20)
    mtp_evals = {10: evaluation(3.9, 0.1, accept=0.25), 20: evaluation(2.9, 0.2, accept=0.5)}
    write_metrics(runs / "mtp", {s: e for s, e in mtp_evals.items() if s <= mtp_steps}, mtp_steps)
    (runs / "throughput.json").write_text(json.dumps({"base@4096": {"tokens_per_s": 1234.0}}))

    assert report(runs, runs / "throughput.json", out, note="a note") == 0

    text = (out / "results.md").read_text()
    assert "a note" in text
    assert f"| mtp | {' '.join(ARMS['mtp'])} | {mtp_steps} | {1000 * mtp_steps:,} |" in text
    # (a): final held-out loss, perplexity, per-domain losses and routing KL of each arm
    assert "| base | 3.0000 | 20.09 | 3.0000 | 4.0000 | 5.0000 | 6.0000 | 0.2000 | 1.50 |" in text
    assert "| micro_batch_lbl | 4.0000 | 54.60 |" in text
    assert "| base | 3.0000 | 1,234 | nan |" in text  # (b), with the lengths not measured shown as such
    compared = 20 if mtp_steps == 20 else 10
    mtp_lm, base_lm = (2.9, 3.0) if compared == 20 else (3.9, 4.0)
    accept = mtp_evals[compared]["eval_mtp_accept"]
    assert f"| mtp | {compared} | {mtp_lm:.4f} | {accept:.3f} |" in text
    assert f"| base | {compared} | {base_lm:.4f} | - (no MTP head) |" in text
    for plot in ("lbl_scope.png", "hybrid.png", "mtp.png"):
        assert (out / plot).stat().st_size > 0
