"""bench_longctx_sp's longest-row search: doubling until a failure, then bisection of the gap."""

from pathlib import Path

import pytest

from tests.helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def search():
    return load_script(BENCH / "bench_longctx_sp.py").longest_row_search


def memory_limit(limit: int, tried: list):
    def fits(T: int) -> bool:
        tried.append(T)
        return T <= limit
    return fits


def test_doubling_stops_at_the_first_failure(search):
    tried = []
    assert search(memory_limit(700, tried), 128, 4096) == (512, "out of memory")
    assert tried == [128, 256, 512, 1024]


def test_refinement_bisects_between_the_last_fit_and_the_failure(search):
    tried = []
    assert search(memory_limit(900, tried), 128, 4096, refine=3, multiple=64) == (896, "out of memory")
    assert tried == [128, 256, 512, 1024, 768, 896, 960]


def test_refinement_respects_the_multiple_and_stops_when_the_gap_closes(search):
    tried = []
    assert search(memory_limit(600, tried), 512, 4096, refine=5, multiple=256) == (512, "out of memory")
    assert tried == [512, 1024, 768]  # the next middle, 640, rounds down to 512: nothing left to try


def test_limit_and_a_failing_start(search):
    tried = []
    assert search(memory_limit(10**9, tried), 128, 512, refine=2) == (512, "--max-tokens")
    assert tried == [128, 256, 512]
    assert search(memory_limit(100, []), 128, 512, refine=2) == (None, "out of memory")
