"""The SLURM launcher for real, on the one-node cluster of launch/local_cluster/start.sh:
launch/submit.sh runs the short pipeline with 2 tasks under ZeRO-3 on CPU and reproduces the
torchrun run's per-step losses; USR1 to the batch script checkpoints every task, requeues the
job and the requeued job resumes exactly; a task killed with -9 fails the job with one clear
line and the next submission resumes from the last checkpoint.

"Matches" means equal per-step losses (bitwise: fp32 on CPU, same ranks, same seeds) in both
training stages, over the same steps."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.conftest import OVERRIDES, ROOT, launch_env, losses, tail

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
LOCAL_CONF = Path(os.environ.get("FACTORY_SLURM_DIR", "/tmp/factory-slurm")) / "slurm.conf"
# On a real cluster: extra launch/submit.sh options (e.g. "--partition debug --time 00:30:00") and
# a longer wait for busy queues.
SUBMIT_ARGS = os.environ.get("FACTORY_TEST_SUBMIT_ARGS", "").split()
JOB_TIMEOUT_S = int(os.environ.get("FACTORY_TEST_JOB_TIMEOUT_S", "900"))


@functools.cache
def cluster_env() -> dict | str:
    """The environment that reaches a cluster (SLURM_CONF as set, else the local cluster's, else the
    site's /etc/slurm/slurm.conf), or why there is none."""
    if shutil.which("sbatch") is None:
        return ("SLURM not installed (sbatch not found): run launch/local_cluster/start.sh (make slurm-up), "
                "which installs slurm-wlm and munge with apt-get and starts a one-node cluster")
    conf = os.environ.get("SLURM_CONF") or next((str(p) for p in (LOCAL_CONF, Path("/etc/slurm/slurm.conf"))
                                                  if p.exists()), None)
    if conf is None:
        return f"no slurm.conf ({LOCAL_CONF} or /etc/slurm): start the local cluster with launch/local_cluster/start.sh"
    env = launch_env(SLURM_CONF=conf)
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 30 s (SLURM_CONF={conf}): is the cluster up (launch/local_cluster/start.sh)?"
    if probe.returncode != 0 or not probe.stdout.strip():
        return (f"no SLURM cluster answers (SLURM_CONF={conf}): start the local one with launch/local_cluster/start.sh"
                f" ({tail(probe.stderr.strip(), 200)})")
    return env


@pytest.fixture(scope="session")  # session, like `reference`, and set up before it: a skip costs no run
def slurm():
    """Submits through launch/submit.sh; cancels whatever it submitted at the end."""
    found = cluster_env()
    if isinstance(found, str):
        pytest.skip(found)
    jobs: list[str] = []

    class Slurm:
        env = found

        def run(self, *cmd: str) -> str:
            return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60).stdout

        def submit(self, out: Path, *extra: str) -> str:
            logs = out.parent / "slurm-%j.out"
            result = subprocess.run([str(ROOT / "launch" / "submit.sh"), "--gpus", "0", "--tasks-per-node", "2",
                                     "--cpus-per-task", "1", "--output", str(logs), *SUBMIT_ARGS, "--", *OVERRIDES,
                                     *extra, f"output_dir={out}"], cwd=ROOT, env=self.env,
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
            jobs.append(job)
            return job

        def job(self, job: str) -> dict[str, str]:
            return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", job)))

        def log(self, out: Path, job: str) -> str:
            path = out.parent / f"slurm-{job}.out"
            return path.read_text(errors="replace") if path.exists() else ""

        def wait(self, out: Path, job: str) -> dict:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while time.monotonic() < deadline:
                info = self.job(job)
                if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                    return info
                # A requeued job waits about 2 minutes before it is eligible again (SLURM's own
                # cool-off); start it now, as an idle cluster would after that wait.
                if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                    self.run("scontrol", "update", f"JobId={job}", "StartTime=now")
                time.sleep(1)
            pytest.fail(f"job {job} still {self.job(job).get('JobState')} after {JOB_TIMEOUT_S} s:\n"
                        f"{tail(self.log(out, job))}")

        def kill_task(self, job: str, rank: int) -> None:
            """kill -9 of one task, run on the job's node (an overlapping step), so this works from a login node."""
            node = self.run("scontrol", "show", "hostnames", self.job(job)["NodeList"]).split()[0]
            script = (f"pid=$(scontrol listpids {job} | awk '$3 == 0 && $5 == {rank} {{print $1}}'); "
                      'test -n "$pid" && kill -9 $pid && echo "killed $pid"')
            result = subprocess.run(["srun", f"--jobid={job}", "--overlap", "-N1", "-n1", f"--nodelist={node}",
                                     "bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=60)
            assert "killed" in result.stdout, result.stdout + result.stderr

    yield Slurm()
    if jobs:
        subprocess.run(["scancel", *jobs], env=Slurm.env, capture_output=True, timeout=30)


def wait_while_running(slurm, out: Path, job: str, done, what: str) -> None:
    """Until ``done()``; fails if the job ends first."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not done():
        state = slurm.job(job).get("JobState")
        if state not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            pytest.fail(f"job {job} is {state} before {what}:\n{tail(slurm.log(out, job))}")
        time.sleep(0.2)


def steps_logged(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_submitted_job_completes_with_the_torchrun_losses(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job = slurm.submit(out)
    info = slurm.wait(out, job)
    log = slurm.log(out, job)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert "2 tasks on" in log and "rendezvous" in log
    assert losses(out) == reference
    assert '"world_size": 2' in (out / "04-distill" / "stage.json").read_text()


def test_usr1_checkpoints_every_task_requeues_and_resumes_exactly(slurm, reference, tmp_path):
    out = tmp_path / "run"
    job = slurm.submit(out, "checkpoint.every_steps=0", "checkpoint.keep_after_stage=true")
    wait_while_running(slurm, out, job, lambda: steps_logged(out / "03-align" / "metrics.jsonl") >= 1,
                       "align's first step")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True, timeout=30)
    info = slurm.wait(out, job)
    log = slurm.log(out, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", tail(log)
    assert "preempted (exit 138): requeueing" in log
    # The tasks stopped themselves after the checkpoint (exit 138), none was killed by the signal.
    assert "Exited with exit code 138" in log and "User defined signal" not in log, tail(log)
    resumed = re.search(r"\[(align|distill)\] resumed from (checkpoint-\d+)", log)
    assert resumed, tail(log)
    stage = "03-align" if resumed.group(1) == "align" else "04-distill"
    checkpoint = out / stage / "checkpoints" / resumed.group(2)
    assert {p.name for p in checkpoint.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert int(resumed.group(2).split("-")[1]) < len(reference[stage])  # stopped mid-stage
    assert losses(out) == reference


def test_task_killed_with_9_fails_the_job_and_resubmission_resumes(slurm, reference, tmp_path):
    out = tmp_path / "run"
    args = ("checkpoint.every_steps=1",)  # the first checkpoint leaves 5 of align's 6 steps to kill the task in
    job = slurm.submit(out, *args)
    latest = out / "03-align" / "checkpoints" / "latest"
    wait_while_running(slurm, out, job, latest.exists, "align's first checkpoint")
    slurm.kill_task(job, rank=1)
    info = slurm.wait(out, job)
    log = slurm.log(out, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", tail(log)
    assert re.search(r"^error: the run failed with exit code \d+ \(not a checkpointed stop\)", log, re.M), tail(log)
    assert not (out / "03-align" / "stage.json").exists()
    saved = latest.read_text().strip()

    again = slurm.submit(out, *args)
    info = slurm.wait(out, again)
    log = slurm.log(out, again)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert f"[align] resumed from {saved}" in log, tail(log)
    assert losses(out) == reference
