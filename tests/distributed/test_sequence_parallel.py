"""Sequence parallelism over 2 gloo ranks equals one rank (GDN head-parallel and all-gathered);
per-document attention equals the dense block-causal mask; unsplittable shapes get clear errors."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from factory.distributed.sequence_parallel import (
    GDN_MODES, SequenceParallel, SequenceParallelError, document_attention, row_layout)
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
    for mode in GDN_MODES:
        assert result.stdout.count(f"SP=2 equals SP=1 with gdn_mode={mode} ") == 2, result.stdout


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


def test_unknown_gdn_mode_is_refused():
    with pytest.raises(SequenceParallelError, match="gdn_mode 'ring' is not one of"):
        SequenceParallel(group=None, degree=2, rank=0, gdn_mode="ring")
    sp = SequenceParallel(group=None, degree=2, rank=0)
    with pytest.raises(SequenceParallelError, match="gdn_mode 'all_gather' is not one of"):
        sp.gdn_mode = "all_gather"


def _dense_block_causal(positions):
    doc = (positions == 0).cumsum(-1)
    T = positions.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]  # [B, 1, T, T]


def test_per_document_attention_equals_dense_block_causal_mask():
    """A row of 3 documents and a row of 2 (with a 1-token document), GQA 4 query / 2 KV heads."""
    torch.manual_seed(0)
    positions = torch.stack([torch.cat([torch.arange(7), torch.arange(12), torch.arange(5)]),
                             torch.cat([torch.arange(23), torch.arange(1)])])
    B, T, H, H_kv, d = 2, 24, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, d, requires_grad=True) for h in (H, H_kv, H_kv))
    dy = torch.randn(B, T, H, d)
    module = SimpleNamespace(num_key_value_groups=H // H_kv, is_causal=True)
    layout = row_layout(positions)
    assert layout.documents == [(0, 7), (7, 19), (19, 24), (24, 47), (47, 48)]

    out = document_attention(module, q, k, v, layout, scaling=d ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    # The reference: K/V repeated to the query heads, one dense [T, T] mask per row.
    kr, vr = (t.repeat_interleave(H // H_kv, dim=2) for t in (k, v))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2),
                                         attn_mask=_dense_block_causal(positions), scale=d ** -0.5).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dy)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_single_document_rows_keep_plain_causal_attention():
    positions = torch.arange(16).expand(2, -1)
    layout = row_layout(positions)
    assert layout.documents is None and layout.cu_seqlens.tolist() == [0, 16, 32]
