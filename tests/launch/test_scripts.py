"""The launch scripts refuse bad input with one error line before anything is submitted."""

from __future__ import annotations

import subprocess

import pytest

from tests.launch.conftest import ROOT


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "--", "+recipe=gdn_50pct"], "error: give output_dir="),
    (["--gpus", "0", "--", "output_dir=/shared/run"], "error: --gpus 0 needs --tasks-per-node N"),
    (["--gpu", "8", "--", "output_dir=/shared/run"], "error: unknown option --gpu"),
])
def test_submit_refuses_bad_input_before_sbatch(args, message):
    result = subprocess.run([str(ROOT / "launch" / "submit.sh"), *args], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"}, timeout=30)  # no sbatch needed: it never gets that far
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchrun_refuses_an_unknown_option():
    result = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "--nodes", "2"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "unknown option --nodes" in result.stderr
