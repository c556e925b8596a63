"""A run killed with SIGKILL, or stopped with SIGINT, resumes to exactly the front of an uninterrupted run."""
import csv
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest

from quantsearch.cli.explore import main
from quantsearch.run.store import RunStore

# the default guided search (model seeds, refitted infill, screening) with early rejection: the replay must take
# the very path of the uninterrupted run
ARGS = ["--pop-size", "6", "--generations", "4", "--eval-samples", "400", "--holdout-samples", "200",
        "--batch-size", "100", "--calib-batches", "1", "--bits", "3:8", "--seed", "2", "--early-reject",
        "--no-progress"]


def table(path, drop=("seconds",)):
    rows = list(csv.DictReader(open(path)))
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def stored(run_dir):
    try:
        with sqlite3.connect(f"file:{run_dir / 'run.sqlite'}?mode=ro", uri=True) as db:  # never creates it
            return db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def interrupt_then_resume(tmp_path, sig, after):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while stored(out) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    at_stop = stored(out)
    assert after <= at_stop
    return out, proc.returncode, err, at_stop


def assert_same_run(resumed, uninterrupted, at_stop):
    assert table(resumed / "evaluations.csv") == table(uninterrupted / "evaluations.csv")
    assert table(resumed / "pareto.csv") == table(uninterrupted / "pareto.csv")
    run, plain = (json.loads((d / "run.json").read_text()) for d in (resumed, uninterrupted))
    assert run["front"] == plain["front"]
    # nothing stored before the stop was evaluated again
    assert run["reused_evaluations"] == at_stop
    assert run["new_evaluations"] == plain["num_evaluations"] - at_stop


def test_sigkill_mid_generation_resumes_to_identical_front(tmp_path, uninterrupted):
    out, code, _, at_stop = interrupt_then_resume(tmp_path, signal.SIGKILL, after=30)
    assert code == -signal.SIGKILL
    assert not (out / "pareto.csv").exists()
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, at_stop)


def test_sigint_stops_cleanly_and_resumes_to_identical_front(tmp_path, uninterrupted):
    out, code, err, at_stop = interrupt_then_resume(tmp_path, signal.SIGINT, after=20)
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, at_stop)


def test_resume_refuses_other_settings_and_other_data(tmp_path, uninterrupted):
    # a copy of its own: the fingerprint changed below must not leak into the run the other tests compare against
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    with closing(sqlite3.connect(uninterrupted / "run.sqlite")) as db:
        fingerprint = db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()[0]
    assert json.loads(fingerprint) != {"model": "other"}
    proc = subprocess.run([sys.executable, "-m", "quantsearch.explore", "--resume", str(run),
                           "--seed", "5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "drop --seed" in proc.stderr
    store = RunStore.open(run)  # as if it had been run there (the settings name the run's own directory)...
    store.put("settings", store.settings | {"out": str(run)})
    store.put("fingerprint", {"model": "other"})  # ...on another model
    store.close()
    proc = subprocess.run([sys.executable, "-m", "quantsearch.explore", "--resume", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model, calibration or data differ" in proc.stderr
    assert "Traceback" not in proc.stderr
    with closing(sqlite3.connect(uninterrupted / "run.sqlite")) as db:  # the shared run is untouched
        assert db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()[0] == fingerprint


# -- faults injected on purpose ------------------------------------------------------------------------------------
def test_a_full_disk_while_committing_evaluations_stops_in_one_line_and_resumes(tmp_path, uninterrupted, capsys,
                                                                                monkeypatch):
    """SQLite's own "database or disk is full" after 25 commits: the run stops (exit 2, one line), every committed
    evaluation is kept, and a resume reaches the uninterrupted front."""
    out, calls = tmp_path / "run", {"n": 0}
    record = RunStore.record

    def full_after_25(self, evaluation, generation):
        calls["n"] += 1
        if calls["n"] > 25:
            raise sqlite3.OperationalError("database or disk is full")
        return record(self, evaluation, generation)

    monkeypatch.setattr(RunStore, "record", full_after_25)
    assert main([*ARGS, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "database or disk is full" in err[0] and f"--resume {out}" in err[0], err
    assert stored(out) == 25
    monkeypatch.setattr(RunStore, "record", record)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, 25)


def test_a_full_disk_while_writing_outputs_keeps_every_evaluation(tmp_path, uninterrupted, capsys, monkeypatch):
    """ENOSPC when pareto.csv is written: exit 2 in one line, no half-written file, and the resume evaluates
    nothing again."""
    import errno

    import quantsearch.run.store as store_module

    out, write = tmp_path / "run", store_module.write_atomic

    def no_space_for_outputs(path, text):
        if str(path).endswith("pareto.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    monkeypatch.setattr(store_module, "write_atomic", no_space_for_outputs)
    assert main([*ARGS, "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert not (out / "pareto.csv").exists() and not list(out.glob(".pareto.csv.*"))
    total = stored(out)
    monkeypatch.setattr(store_module, "write_atomic", write)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, total)


def kill_at(tmp_path, phase: str, seed: int) -> tuple:
    """Start the run and SIGKILL it in ``phase``: during calibration (before any evaluation), at a random point of
    the search, or once every evaluation is stored (the hold-out check and the outputs)."""
    import random

    rng = random.Random(seed)
    out = tmp_path / f"{phase}-{seed}"
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    if phase == "calibration":
        while not (out / ".owner.lock").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
    else:
        total = int(json.loads((UNINTERRUPTED_TOTAL[0] / "run.json").read_text())["num_evaluations"])
        target = total if phase == "outputs" else rng.randint(1, total - 1)
        while stored(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before the kill ({phase}, seed {seed})"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return out, stored(out)


UNINTERRUPTED_TOTAL = []


@pytest.mark.parametrize("phase,seed", [
    ("search", 0), ("calibration", 0), ("outputs", 0),
    *[pytest.param("search", s, marks=pytest.mark.slow) for s in (1, 2, 3, 4)],
    *[pytest.param(p, s, marks=pytest.mark.slow) for p in ("calibration", "outputs") for s in (1, 2)]])
def test_sigkill_at_random_points_resumes_to_the_same_front(tmp_path, uninterrupted, phase, seed):
    UNINTERRUPTED_TOTAL[:] = [uninterrupted]
    out, at_stop = kill_at(tmp_path, phase, seed)
    if not (out / "run.sqlite").exists():  # killed before the store existed: a fresh start, not a resume
        assert main([*ARGS, "--out", str(out)]) == 0
    else:
        assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, at_stop)


def test_sigint_twice_stops_at_once_and_resumes_to_identical_front(tmp_path, uninterrupted):
    """The second Ctrl-C stops at once (KeyboardInterrupt mid-evaluation): still one line, exit 130, and nothing
    committed is lost. Further Ctrl-Cs while the process exits never surface a traceback."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while stored(out) < 15 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    while proc.poll() is None and time.time() < deadline:  # an impatient user: Ctrl-C until the prompt returns,
        proc.send_signal(signal.SIGINT)  # including while the interpreter tears down
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    at_stop = stored(out)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert_same_run(out, uninterrupted, at_stop)
