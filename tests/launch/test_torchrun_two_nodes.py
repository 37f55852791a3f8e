"""Two nodes with torchrun, both on this machine: two ``launch/torchrun.sh --nnodes 2 --nproc 1``
processes (NODE_RANK 0 and 1) share one output_dir and reproduce the per-step losses of one
node with 2 ranks. Every file write in the run directory is audited (strace of each "node":
opens for writing and renames, from Python, C++ and Rust alike): no file has two writers, and
rank 1 writes only its own checkpoint shards, rank 0 everything else."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch.conftest import OVERRIDES, ROOT, free_port, launch_env, losses, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")
# rename("a", "b") = 0 / renameat2(AT_FDCWD, "a", AT_FDCWD, "b", ...) = 0: b is written.
RENAME = re.compile(r'^rename\w*\(.*"([^"]+)".*"([^"]+)".*\)\s+=\s+0$')
OPEN = re.compile(r'^(?:openat|open|creat)\((?:AT_FDCWD, )?"([^"]+)", ([^,)]+).*\)\s+=\s+\d+$')
OWN_SHARDS = re.compile(r"(rng-rank1\.pt|zero_pp_rank_1_mp_rank_\d+_(optim|model)_states\.pt)$")


def written(traces: list[Path], root: Path) -> set[str]:
    """Paths under ``root`` that one node's processes opened for writing or renamed onto."""
    assert traces, "no strace output"
    paths = set()
    lines = (line for trace in traces for line in trace.read_text(errors="replace").splitlines())
    for line in lines:
        if m := OPEN.match(line):
            if WRITE_FLAGS.search(m.group(2)):
                paths.add(m.group(1))
        elif m := RENAME.match(line):
            paths.add(m.group(2))
    prefix = f"{root}/"
    return {p[len(prefix):] for p in paths if p.startswith(prefix)}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    base = tmp_path_factory.mktemp("two_nodes")
    out = base / "run"
    strace = shutil.which("strace")
    env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    nodes = []
    for rank in (0, 1):
        # -ff: one trace file per process, so no call is split across interleaved lines.
        audit = [strace, "-ff", "-qq", "--seccomp-bpf", "-s", "4096", "-o", str(base / f"node{rank}.trace"),
                 "-e", "trace=open,openat,creat,rename,renameat,renameat2"] if strace else []
        cmd = [*audit, str(ROOT / "launch" / "torchrun.sh"), "--nnodes", "2", "--nproc", "1", "--", *OVERRIDES,
               "checkpoint.every_steps=2", f"output_dir={out}"]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = [node.communicate(timeout=900)[0] for node in nodes]
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}:\n{tail(logs[rank])}"
    return out, base if strace else None


def test_two_nodes_reproduce_one_node_of_two_ranks(two_nodes, reference):
    out, _ = two_nodes
    assert losses(out) == reference
    assert '"world_size": 2' in (out / "04-distill" / "stage.json").read_text()


def test_rank_0_writes_the_run_directory_and_no_file_has_two_writers(two_nodes):
    out, traces = two_nodes
    if traces is None:
        pytest.skip("strace not installed: the write audit needs it (apt-get install strace)")
    node0, node1 = (written(sorted(traces.glob(f"node{rank}.trace.*")), out) for rank in (0, 1))
    assert {"pipeline.json", "03-align/stage.json", "04-distill/model/model.safetensors",
            "04-distill/metrics.jsonl"} <= node0  # the audit sees Python's and safetensors' (Rust) writes
    assert node0 & node1 == set()
    assert node1 and all(OWN_SHARDS.search(p) for p in node1), sorted(node1)
    assert not any("rank1" in p or "rank_1_" in p for p in node0)
