"""launch/slurm/pretrain.sbatch against a real one-node Slurm started on this machine.

Needs Debian's slurmctld, slurmd, slurm-client and munge installed (.ci/run installs them as root;
without them the tests are skipped, saying so), and starts munged, slurmctld and slurmd as root with a
throw-away config (no systemd here:
linuxproc process tracking, no task plugin, no accounting), submits the sbatch script with the tiny
preset on CPU with 2 processes, and checks what Slurm and the run directory say. The daemons it
started are stopped by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.test_training import REPO, overrides, read_metrics, write_corpus

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def ensure_slurm_installed() -> None:
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(tool)]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): `apt-get install {' '.join(PACKAGES)}` "
            "(Debian; .ci/run does it as root) runs these tests"
        )


def slurm_conf(state: Path, host: str, cpus: int) -> str:
    return f"""
ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment that points clients at it."""
    ensure_slurm_installed()
    state = tmp_path_factory.mktemp("slurm")
    for sub in ("ctld", "d"):
        (state / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = state / "slurm.conf"
    conf.write_text(slurm_conf(state, host, os.cpu_count() or 1))
    env = dict(os.environ, SLURM_CONF=str(conf))

    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    daemons = []
    try:
        if not Path("/run/munge/munge.socket.2").exists():
            daemons.append(subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"]))
            wait_for(lambda: Path("/run/munge/munge.socket.2").exists(), 20, "munged socket")
        daemons.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(conf)], env=env))
        daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env))

        def node_idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            return "idle" in out

        wait_for(node_idle, 60, "the node did not come up idle")
        yield env
    finally:
        for proc in reversed(daemons):
            proc.terminate()
        for proc in reversed(daemons):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def job_fields(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def submit(slurm: dict, tmp_path: Path, args: list[str]) -> str:
    """sbatch the script with Hydra overrides `args` on 2 CPU processes; the job id."""
    env = dict(slurm, PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    env["MASTER_PORT"] = "0"  # one node: the rendezvous binds a port the system picks, none to race for
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(REPO), "--output", str(tmp_path / "slurm-%j.out"),
         "launch/slurm/pretrain.sbatch", *args],
        env=env, capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return submitted.stdout.strip().split(";")[0]


def wait_until_final(job_id: str, slurm: dict, timeout: float) -> dict[str, str]:
    def final():
        fields = job_fields(job_id, slurm)
        return fields if fields.get("JobState") in FINAL_STATES else None

    return wait_for(final, timeout, f"job {job_id} did not finish", 1)


def test_sbatch_runs_the_tiny_preset_to_completion(slurm, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    args = overrides(corpus, run_dir, **{"trainer.max_steps": 4, "optim.schedule_steps": 4})
    job_id = submit(slurm, tmp_path, args)
    fields = wait_until_final(job_id, slurm, 240)
    log = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{log[-3000:]}"
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / f"slurm-{job_id}.log").read_text().count("step") >= 4, "console copy in run.dir"
    assert "2 process(es)" in log


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """The USR1 Slurm sends before the time limit (here sent by hand): the run checkpoints and exits 0,
    the job requeues itself, and the second start resumes and finishes, each step logged once. The
    tasks get a SIGTERM as well (as from preemption, or the limit itself): torchrun, signalled, exits 1
    while its workers save and exit 0, and the script still counts the stop a success and requeues.
    The job asks to start over (checkpoint.resume=none): that holds for its first start, not its restart."""
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    steps = 150  # many more than run before the signals land (about 0.1 s a step): it must not end first
    settings = {"trainer.max_steps": steps, "optim.schedule_steps": steps, "checkpoint.resume": "none"}
    args = overrides(corpus, run_dir, **settings)
    job_id = submit(slurm, tmp_path, args)
    metrics = run_dir / "metrics.jsonl"
    logged = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3
    wait_for(logged, 120, "no steps logged", interval=0.1)
    subprocess.run(["scancel", "--signal=TERM", job_id], env=slurm, check=True)  # the tasks, not the script
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm, check=True)
    # a requeued job waits two minutes before it may start again (Slurm's rule); let it start now
    wait_for(lambda: job_fields(job_id, slurm).get("Restarts") == "1", 120, "the job did not requeue", 1)
    # slurmd revokes the ended start's credential with a one-second clock: a restart whose credential
    # is issued within that second is refused ("Job credential revoked") and the job fails
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True)

    fields = wait_until_final(job_id, slurm, 300)
    log = (run_dir / f"slurm-{job_id}.log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{log[-3000:]}"
    assert fields["Restarts"] == "1", fields
    assert "asking the run to checkpoint and stop" in log and "resuming from" in log
    assert "a restart: resuming what this job saved, with checkpoint.resume=auto" in log
    assert "torchrun's exit status 1 is its own: exit 0" in log, log[-3000:]
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert not (run_dir / "STOP").exists()
