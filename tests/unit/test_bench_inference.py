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
