"""The same settings and seed give byte-identical results on the same machine: two fresh processes run the default
guided search (W+A genes, BOPs, early rejection on) and their evaluations.csv agree value for value once the
timing column is removed; the front, its bit-configs and the store's evaluations agree too. Another seed gives another
run (so the comparison can fail)."""
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARGS = ["--pop-size", "6", "--generations", "2", "--eval-samples", "400", "--holdout-samples", "200",
        "--batch-size", "100", "--calib-batches", "1", "--bits", "3:8", "--weight-bits", "3:8",
        "--search-space", "both", "--cost", "bops", "--early-reject", "--no-progress"]


def without_timing(path: Path) -> list[list[str]]:
    """evaluations.csv's rows, the ``seconds`` column cut out of every one (a rejection's message holds commas:
    the file is read as CSV)."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    drop = rows[0].index("seconds")
    return [[c for i, c in enumerate(row) if i != drop] for row in rows]


def store_rows(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "run.sqlite") as db:
        return db.execute("SELECT genome, accuracy, costs, generation, status, message, samples "
                          "FROM evaluations ORDER BY id").fetchall()


def test_same_seed_same_bytes_other_seed_other_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    runs = {"a": ("0", tmp_path / "a"), "b": ("0", tmp_path / "b"), "other": ("1", tmp_path / "other")}

    def run(item):
        seed, out = item
        return subprocess.run([sys.executable, "-m", "quantsearch.explore", *ARGS, "--seed", seed, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=3) as pool:
        for proc in pool.map(run, runs.values()):
            assert proc.returncode == 0, proc.stderr
    a, b, other = (runs[k][1] for k in ("a", "b", "other"))
    assert without_timing(a / "evaluations.csv") == without_timing(b / "evaluations.csv")
    assert (a / "pareto.csv").read_bytes() == (b / "pareto.csv").read_bytes()
    for point in sorted((a / "pareto").glob("*.json")):
        assert point.read_bytes() == (b / "pareto" / point.name).read_bytes(), point.name
    rows = store_rows(a)
    assert rows == store_rows(b)
    assert max(r[3] for r in rows) >= 2 and len(rows) >= 15  # the baselines, the seeds and two generations bred
    summary = json.loads((a / "run.json").read_text())
    assert summary["search"]["algorithm"] == "guided" and summary["search"]["early_rejection"]["evaluations"] > 0
    assert json.loads((b / "run.json").read_text())["front"] == summary["front"]
    # another seed draws other splits and another search: the comparison above can fail
    assert without_timing(other / "evaluations.csv") != without_timing(a / "evaluations.csv")
