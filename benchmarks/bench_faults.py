"""Faults injected on purpose, and what survives them: a table of fault, trials, evaluations lost, fronts identical.

Each trial starts the same small run (the default guided search with early rejection), injects one fault, then
resumes and compares the resumed run with an uninterrupted one: evaluations.csv (timings aside), pareto.csv and the
front. "Stored" is what the run store held when the fault hit; "lost" is what it held but the resume did not read
back (always 0 if nothing committed is lost; the candidate in flight was never finished, so it is not counted).

    PYTHONPATH=src python benchmarks/bench_faults.py [--seeds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantsearch.cli.explore import main
from quantsearch.run.store import RunStore
from quantsearch.run.tables import format_table

ARGS = ["--pop-size", "6", "--generations", "4", "--eval-samples", "400", "--holdout-samples", "200",
        "--batch-size", "100", "--calib-batches", "1", "--bits", "3:8", "--seed", "2", "--early-reject",
        "--no-progress", "--log-level", "ERROR"]


def stored(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as db:  # never creates it
            return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    except sqlite3.Error:
        return 0


def table(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]


def same_run(run: Path, plain: Path) -> bool:
    a, b = (json.loads((d / "run.json").read_text()) for d in (run, plain))
    return (table(run / "evaluations.csv") == table(plain / "evaluations.csv")
            and table(run / "pareto.csv") == table(plain / "pareto.csv") and a["front"] == b["front"])


def signal_run(out: Path, phase: str, rng: random.Random, total: int, signals=(signal.SIGKILL,)) -> int:
    """Start the run in a process, send ``signals`` in ``phase``; returns the evaluations stored then."""
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *ARGS, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    if phase == "calibration":
        while not (out / ".owner.lock").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        target = total if phase == "outputs" else rng.randint(1, total - 1)
        while stored(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    for sig in signals:
        if proc.poll() is None:
            proc.send_signal(sig)
            time.sleep(0.05)
    proc.wait(timeout=120)
    return stored(out)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Ray's head processes and actors, for a run with --workers)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def lose_ray_head(out: Path, rng: random.Random, total: int) -> int:
    """A run on 2 Ray workers whose head (GCS, raylet) and actors are killed mid-search: Ray itself ends the
    driver once it gives up reconnecting to the head (after 60 s by default; 10 s here, so the trial is quicker);
    the resume then runs serially (workers never change results)."""
    import os as os_

    env = dict(os_.environ, RAY_gcs_rpc_server_reconnect_timeout_s="10")
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *ARGS, "--workers", "2", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline, target = time.time() + 300, rng.randint(12, total - 2)
    while stored(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in descendants(proc.pid):
        try:
            os_.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    at_fault = stored(out)
    proc.wait(timeout=300)
    return at_fault


def full_disk(out: Path, where: str) -> int:
    """The run in this process, with ENOSPC injected into the store's commits or the outputs' writes."""
    import quantsearch.run.store as store_module

    record, write = RunStore.record, store_module.write_atomic
    calls = {"n": 0}

    def full_record(self, evaluation, generation):
        calls["n"] += 1
        if calls["n"] > 25:
            raise sqlite3.OperationalError("database or disk is full")
        return record(self, evaluation, generation)

    def full_write(path, text):
        if str(path).endswith("pareto.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    if where == "commits":
        RunStore.record = full_record
    else:
        store_module.write_atomic = full_write
    try:
        assert quiet([*ARGS, "--out", str(out)]) == 2
    finally:
        RunStore.record, store_module.write_atomic = record, write
    return stored(out)


def quiet(argv: list[str]) -> int:
    """``explore`` in this process, its printed report discarded (only the table below is this script's output)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return main(argv)


def resume(out: Path) -> dict:
    if (out / "run.sqlite").exists():
        assert quiet(["--resume", str(out), "--no-progress", "--log-level", "ERROR"]) == 0
    else:  # stopped before the store existed: nothing to resume, the same command starts it again
        assert quiet([*ARGS, "--out", str(out)]) == 0
    return json.loads((out / "run.json").read_text())


def main_() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="kill times drawn per SIGKILL-in-search row")
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray row (it needs about 90 s)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    plain = tmp / "plain"
    assert quiet([*ARGS, "--out", str(plain)]) == 0
    total = json.loads((plain / "run.json").read_text())["num_evaluations"]
    faults = [("SIGKILL during the search", [("search", s) for s in range(args.seeds)]),
              ("SIGKILL during calibration", [("calibration", s) for s in range(2)]),
              ("SIGKILL during hold-out check / outputs", [("outputs", s) for s in range(2)]),
              ("SIGINT twice (the second stops at once)", [("search-int", s) for s in range(2)]),
              ("full disk while committing evaluations", [("commits", 0)]),
              ("full disk while writing outputs", [("writes", 0)])]
    if args.ray:
        faults.append(("Ray head and actors killed (--workers 2)", [("ray", 0)]))
    rows = []
    for name, trials in faults:
        at_fault, lost, identical = [], 0, 0
        for phase, seed in trials:
            out, rng = tmp / f"{phase}-{seed}", random.Random(seed)
            if phase in ("commits", "writes"):
                n = full_disk(out, phase)
            elif phase == "ray":
                n = lose_ray_head(out, rng, total)
            elif phase == "search-int":
                n = signal_run(out, "search", rng, total, (signal.SIGINT, signal.SIGINT))
            else:
                n = signal_run(out, phase, rng, total)
            run = resume(out)
            at_fault.append(n)
            lost += n - run["reused_evaluations"]
            identical += same_run(out, plain)
        rows.append([name, len(trials), ", ".join(map(str, at_fault)), lost, f"{identical}/{len(trials)}"])
        print(f"{name}: done", file=sys.stderr)
    print(f"a run of {total} evaluations (guided, early rejection), each fault then --resume, compared with the "
          "uninterrupted run")
    print(format_table(["fault", "trials", "evaluations stored at the fault", "evaluations lost",
                        "fronts identical after resume"], rows))


if __name__ == "__main__":
    main_()
