"""A run directory has one owner: a live run refuses a second explore, --resume and --overwrite in one line; a dead
owner's lock is gone with it; readers are never blocked and are told the run is still live."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from quantsearch.run.lock import LOCK_NAME, RunLock, live_owner
from quantsearch.run.store import StoreError

TINY = ["--bits", "4:8", "--pop-size", "4", "--generations", "1", "--eval-samples", "200", "--holdout-samples",
        "100", "--calib-batches", "1", "--batch-size", "100", "--no-progress", "--log-level", "WARNING"]


def explore(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "quantsearch.explore", *TINY, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def message(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_a_live_owner_refuses_a_second_run_resume_and_overwrite(tmp_path):
    out = tmp_path / "run"
    assert explore("--out", out).returncode == 0  # a finished run to resume or overwrite
    with RunLock.acquire(out):  # this process is now the run's live owner
        assert live_owner(out)["pid"] == os.getpid()
        for args in ([*TINY, "--out", out, "--overwrite"], ["--resume", out, "--no-progress"]):
            proc = subprocess.run([sys.executable, "-m", "quantsearch.explore", *map(str, args)],
                                  capture_output=True, text=True, timeout=300)
            lines = message(proc)
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert "is in use by a live run" in lines[0] and f"pid {os.getpid()}" in lines[0], lines
        with pytest.raises(StoreError, match="in use by a live run"):
            RunLock.acquire(out)
        from quantsearch.run.record import load_run

        assert load_run(out).running  # readers are not blocked, and know the run is live
    assert live_owner(out) is None and not load_run(out).running


def test_a_killed_owner_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from quantsearch.run.lock import RunLock; "
                               f"lock = RunLock.acquire({str(out)!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert live_owner(out)["pid"] == holder.pid
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert (out / LOCK_NAME).is_file() and live_owner(out) is None  # the file stays, the lock died with it
    RunLock.acquire(out).release()


def test_two_runs_started_together_on_one_directory_one_wins(tmp_path):
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *TINY, "--out", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert ("in use by a live run" in loser or "already holds a run" in loser), loser
    assert json.loads((out / "run.json").read_text())["front"] is not None


def test_a_live_run_without_results_is_reported_as_running(tmp_path):
    from quantsearch.run.record import load_run

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *TINY, "--generations", "30",
                             "--pop-size", "8", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "run.sqlite").is_file():
            time.sleep(0.2)
        assert live_owner(out)["pid"] == proc.pid
        with pytest.raises(StoreError, match="is still running"):
            load_run(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert live_owner(out) is None


def test_overwrite_leaves_no_result_of_the_old_run(tmp_path):
    out = tmp_path / "run"
    assert explore("--out", out).returncode == 0
    before = len(list((out / "pareto").glob("point_*.json")))
    proc = explore("--out", out, "--overwrite", "--bits", "8:8")  # one width: a front of one point
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "run.json").read_text())
    points = sorted((out / "pareto").glob("point_*.json"))
    assert before > 1 and len(points) == len(run["front"]) == 1
    assert json.loads(points[0].read_text())["settings"]["bits"] == "8:8"
