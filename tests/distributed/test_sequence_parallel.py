"""Sequence parallelism over 2 gloo ranks equals one rank; unsplittable shapes get clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factory.distributed.sequence_parallel import SequenceParallel, SequenceParallelError
from tests.distributed.test_zero3 import free_port
from tests.helpers import hybrid_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_sp2_equals_sp1_for_a_50pct_hybrid_on_packed_rows():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), "-m", "tests.distributed.sp_check"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("SP=2 equals SP=1") == 2


@pytest.mark.parametrize("overrides, seq_len, field", [
    ({}, 31, "row length 31"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 8}, 32, "num_key_value_heads=3"),
    ({"linear_num_value_heads": 1}, 32, "linear_num_value_heads=1"),
])
def test_unsplittable_shapes_are_refused(overrides, seq_len, field):
    sp = SequenceParallel(group=None, degree=2, rank=0)
    with pytest.raises(SequenceParallelError) as err:
        sp.check(hybrid_config(**overrides), seq_len)
    assert field in str(err.value) and "\n" not in str(err.value)
