"""CPU smoke test of bench/bench_inference.py at a tiny shape, so that the benchmark cannot rot."""

import json
from pathlib import Path

from tests.helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_inference.py"


def test_bench_inference_runs_on_cpu_and_writes_ratios(tmp_path):
    bench = load_script(BENCH)
    out = tmp_path / "inference.json"
    bench.main(["--shape", "tiny", "--layers", "2", "--contexts", "8,12", "--decode-steps", "2", "--iters", "1",
                "--cpu-memory-gib", "0.0002", "--generate-context", "8", "--device", "cpu", "--json", str(out)])
    results = json.loads(out.read_text())
    static = [r for r in results["rows"] if r["kind"] == "static"]
    assert {(r["model"], r["context"]) for r in static} == {(m, c) for m in ("hybrid", "teacher") for c in (8, 12)}
    for row in static:
        assert row["prefill_ms"] > 0 and row["decode_b1_tok_s"] > 0 and row["max_batch"] >= 1
    hybrid, teacher = (next(r for r in static if r["model"] == m and r["context"] == 12) for m in ("hybrid", "teacher"))
    # One attention layer of two holds a KV cache in the hybrid, plus a fixed-size GDN state.
    assert hybrid["per_seq_bytes"] < teacher["per_seq_bytes"] + 2 * 4 * 16 * 16 * 4
    assert set(results["ratios"]["12"]) >= {"prefill_speedup", "decode_b1", "concurrency", "decode_saturated"}
    assert any("generate_cudnn_ms_per_step" in r for r in results["rows"])


EXPORT_BENCH = BENCH.with_name("bench_inference_export.py")


def test_export_bench_runs_stock_transformers_on_cpu(tmp_path):
    """The stock-transformers benchmark of the Qwen3.5 export, in a fresh interpreter with fla blocked
    (transformers' Qwen3.5 would otherwise pick fla's kernels for CPU tensors)."""
    import subprocess
    import sys

    out = tmp_path / "export.json"
    argv = ["x", "--shape", "tiny", "--layers", "2", "--contexts", "8,12", "--decode-steps", "2", "--iters", "1",
            "--device", "cpu", "--json", str(out)]
    script = (f"import sys, runpy; sys.modules['fla'] = None; sys.modules['causal_conv1d'] = None; sys.argv = {argv!r}; "
              f"runpy.run_path({str(EXPORT_BENCH)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {(r["model"], r["context"]) for r in results["rows"]} == {(m, c) for m in ("qwen3_5", "qwen3") for c in (8, 12)}
    for row in results["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_b1_tok_s"] > 0 and row["cache_bytes"] > 0
    rows = {(r["model"], r["context"]): r for r in results["rows"]}
    qwen3_5, qwen3 = rows["qwen3_5", 12], rows["qwen3", 12]
    # Layer 1 of 2 is GDN: half the KV cache, plus a fixed-size conv and recurrent state.
    assert qwen3_5["cache_bytes"] != qwen3["cache_bytes"]
    assert set(results["ratios"]["12"]) == {"prefill_speedup", "decode_b1", "cache_memory"}
