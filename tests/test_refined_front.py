"""The refined front (issue 30): candidates near the floor refined after the search, within a budget, written as
re-appliable bit-configs, read back on resume, and reported."""
import json
import re

import pytest

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig

ARGS = ["--search-space", "both", "--pop-size", "4", "--generations", "1", "--eval-samples", "200",
        "--validation-samples", "100", "--holdout-samples", "200", "--calib-batches", "1", "--batch-size", "100",
        "--no-progress", "--log-level", "WARNING", "--refine", "brecq-lsq", "--refine-iterations", "5",
        "--refine-margin", "1.0"]


@pytest.fixture(scope="module")
def refined_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("refined") / "run"
    assert explore_main(ARGS + ["--refine-budget", "1000", "--out", str(out)]) == 0
    return out


def test_refined_points_are_written_checked_and_reapply_identically(refined_run, capsys):
    """Every candidate (a margin of 1.0 admits all of them below the cheapest point that held) is refined within
    a large budget; each point records its accuracies on every split and re-applies to identical ones."""
    summary = json.loads((refined_run / "run.json").read_text())
    refined = summary["refined_front"]
    points = refined["points"]
    assert refined["method"] == "brecq-lsq" and refined["iterations"] == 5
    assert len(points) == refined["candidates"] >= 2 and refined["spent"] <= refined["budget"]
    assert "refine" in summary["timings_s"]
    for point in points:
        config = BitConfig.load(refined_run / point["bitconfig"])
        assert config.refined["method"] == "brecq-lsq" and config.refined["options"] == {"iterations": 5}
        assert config.accuracy == {"search": point["search"], "holdout": point["holdout"],
                                   "validation": point["validation"]}
        assert config.confidence["validation_passed"] == point["validation_passed"]
        assert list(config.bits.values()) == point["bits"]
    cheapest = min(summary["front"], key=lambda p: p["costs"]["bits"])["costs"]["bits"]
    assert all(p["costs"]["bits"] < cheapest for p in points)
    capsys.readouterr()
    assert apply_main([str(refined_run / points[0]["bitconfig"]), "--check"]) == 0
    printed = capsys.readouterr().out
    assert all(re.search(rf"^\s*{split}\b.*identical\s*$", printed, re.M) for split in ("search", "holdout"))
    assert "## Refined front (brecq-lsq, 5 iterations)" in (refined_run / "report.md").read_text()


def test_resume_reads_refined_points_back(refined_run):
    """A finished run resumed refines nothing again: every refined point is read back from its bit-config."""
    before = json.loads((refined_run / "run.json").read_text())["refined_front"]["points"]
    assert explore_main(["--resume", str(refined_run), "--no-progress", "--log-level", "WARNING"]) == 0
    after = json.loads((refined_run / "run.json").read_text())["refined_front"]["points"]
    assert [p["bitconfig"] for p in after] == [p["bitconfig"] for p in before]
    assert all(p.get("read_back") for p in after)
    assert [(p["search"], p["holdout"], p["validation_passed"]) for p in after] == [
        (p["search"], p["holdout"], p["validation_passed"]) for p in before]


def test_budget_bounds_the_refined_front(tmp_path):
    """A budget below one refinement's cost refines the first candidate only (its cost is not known before)."""
    out = tmp_path / "run"
    assert explore_main(ARGS + ["--refine-budget", "0.001", "--out", str(out)]) == 0
    refined = json.loads((out / "run.json").read_text())["refined_front"]
    assert len(refined["points"]) == 1 < refined["candidates"]
    assert refined["spent"] > refined["budget"]
