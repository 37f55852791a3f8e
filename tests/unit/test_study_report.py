"""The study's report: docs/QUALITY.md's study section is what report.py makes of the committed
results, and regenerating it leaves the other sections alone."""

import json
from pathlib import Path

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "bench" / "study"


def _report_module():
    return load_script(STUDY / "report.py")


def _committed_section(report, goals_on_candidate: bool = True) -> str:
    """The section as report.py's docstring says QUALITY.md was generated."""
    candidate_path = "bench/study/results_candidate.json"
    candidate = {**json.loads((ROOT / candidate_path).read_text()), "source": candidate_path}
    return report.section(json.loads((STUDY / "results.json").read_text()), "alternate",
                          (STUDY / "conclusion.md").read_text(),
                          json.loads((STUDY / "calibration.json").read_text()), candidate,
                          "random gate, identity conv", goals_on_candidate)


def test_quality_doc_is_the_report_of_the_committed_results():
    report = _report_module()
    quality = (ROOT / "docs" / "QUALITY.md").read_text()
    start = quality.index(report.SECTION)
    end = quality.find("\n## ", start + len(report.SECTION))
    in_doc = quality[start:end + 1] if end >= 0 else quality[start:]
    assert in_doc == _committed_section(report)


def test_candidate_tables_and_goals_follow_the_candidate_arms():
    report = _report_module()
    on_candidate, on_published = _committed_section(report), _committed_section(report, goals_on_candidate=False)
    assert "### Selection with the candidate initialization (random gate, identity conv)" in on_candidate
    for ratio in (25, 50, 75):
        assert f"#### {ratio}% GDN" in on_candidate
    goals = [text[text.index("### Goals, evaluated for"):] for text in (on_candidate, on_published)]
    assert goals[0].startswith("### Goals, evaluated for the default recipe (`alternate`, random gate, identity conv)")
    assert goals[1].startswith("### Goals, evaluated for `alternate`")
    assert goals[0].split("\n", 1)[1] != goals[1].split("\n", 1)[1]  # other arms, other verdicts


def test_write_quality_replaces_only_its_section(tmp_path):
    report = _report_module()
    doc = tmp_path / "QUALITY.md"
    doc.write_text(f"# Quality\n\n## Before\n\nkept\n\n{report.SECTION}\n\nold\n\n## After\n\nalso kept\n")
    report.write_quality(doc, f"{report.SECTION}\n\nnew\n")
    text = doc.read_text()
    assert "old" not in text and text.endswith(f"{report.SECTION}\n\nnew\n")
    assert "## Before\n\nkept" in text and "## After\n\nalso kept" in text
