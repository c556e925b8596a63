"""Bad input through the real command line: one line naming the problem, exit status 2, never a traceback.

Every case runs ``python -m quantsearch.<entry point>`` in its own subprocess, as a shell would; the cases are
started side by side (one per core) so that the table costs tens of seconds, not minutes.
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from quantsearch.sources.models import create_demo_vit
from quantsearch.run.store import RunStore

SRC = str(Path(__file__).resolve().parents[1] / "src")
# small splits and budgets, for the cases that get as far as loading the model; a case's own flags win
TINY = {"--eval-samples": "200", "--holdout-samples": "100", "--calib-batches": "1", "--batch-size": "100",
        "--pop-size": "4", "--generations": "1"}


class Evil:
    """Unpickling this would run code (create ``marker``): ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _files(tmp: Path) -> dict[str, str]:
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    (tmp / "typo.yaml").write_text("pop_sise: 4\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "garbage.pt").write_text("not a checkpoint")
    (tmp / "empty_dir").mkdir()
    (tmp / "calibration.json").write_text("{}")
    (tmp / "point.json").write_text('{"format": "quantsearch-bitconfig", "schema_version": 2}')
    (tmp / "held").mkdir()
    RunStore.create(tmp / "held", {"seed": 0}).close()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "run.sqlite").write_bytes(b"this is not a database at all" * 10)
    truncated = tmp / "truncated"
    store = RunStore.create(truncated, {"seed": 0})
    store._db.executemany("INSERT INTO meta VALUES (?, ?)", [(f"k{i}", "x" * 3000) for i in range(40)])
    store._db.commit()
    store.close()
    data = (truncated / "run.sqlite").read_bytes()
    (truncated / "run.sqlite").write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    torch.save({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, tmp / "other_model.pt")
    torch.save({"model": Evil(tmp / "evil_ran")}, tmp / "evil.pt")
    state = create_demo_vit().state_dict()
    zero = {k: (torch.zeros_like(v) if k.startswith("blocks.0.mlp.fc2.") else v) for k, v in state.items()}
    torch.save(zero, tmp / "dead_layer.pt")
    nan = dict(state)
    nan["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    torch.save(nan, tmp / "nan_head.pt")
    names = ["bad.yaml", "typo.yaml", "list.yaml", "garbage.pt", "empty_dir", "calibration.json", "point.json",
             "held", "corrupt", "truncated", "other_model.pt", "evil.pt", "dead_layer.pt", "nan_head.pt"]
    return {Path(n).stem: str(tmp / n) for n in names}


# (entry point, arguments, words the one-line message must contain); {name} is a file made by _files
CASES = [
    ("explore", ["--model", "no_such_model_xyz"], ["unknown model", "no_such_model_xyz"]),
    ("explore", ["--model", "nosuchpkg.mod:build"], ["cannot import", "nosuchpkg"]),
    ("explore", ["--checkpoint", "/nonexistent/weights.pt"], ["checkpoint", "does not exist"]),
    ("explore", ["--checkpoint", "{garbage}"], ["cannot read checkpoint"]),
    ("explore", ["--checkpoint", "{evil}"], ["cannot read checkpoint", "as weights"]),
    ("explore", ["--checkpoint", "{other_model}"], ["does not fit", "patch_embed.proj.weight", "unexpected"]),
    ("explore", ["--checkpoint", "{dead_layer}"], ["quantizer 'blocks.0.mlp.fc2'", "cannot quantize"]),
    ("explore", ["--checkpoint", "{nan_head}"], ["quantizer 'head'", "saw NaN or Inf"]),
    ("explore", ["--dataset", "imagefolder:/nonexistent/images"], ["/nonexistent/images", "not a directory"]),
    ("explore", ["--dataset", "fashion-mnist:{empty_dir}"], ["fashion-mnist"]),
    ("explore", ["--dataset", "mnist"], ["unknown dataset 'mnist'"]),
    ("explore", ["--config", "/nonexistent/run.yaml"], ["cannot read config file"]),
    ("explore", ["--config", "{bad}"], ["not valid YAML", "at line"]),
    ("explore", ["--config", "{typo}"], ["unknown key 'pop_sise'", "did you mean 'pop-size'"]),
    ("explore", ["--config", "{list}"], ["must hold a mapping"]),
    ("explore", ["--bits", "1:8"], ["bits 1:8", "2..16"]),
    ("explore", ["--bits", "2:17"], ["bits 2:17", "2..16"]),
    ("explore", ["--bits", "8:4"], ["bits 8:4", "LO is greater than HI"]),
    ("explore", ["--bits", "eight"], ["bits must look like LO:HI"]),
    ("explore", ["--weight-bits", "9:3"], ["weight-bits 9:3", "LO is greater than HI"]),
    ("explore", ["--min-accuracy", "1.5"], ["min-accuracy", "[0, 1]"]),
    ("explore", ["--min-accuracy", "0.99"], ["above the FP32", "search split (0."]),
    ("explore", ["--max-accuracy-drop", "-0.1"], ["max-accuracy-drop", "[0, 1]"]),
    ("explore", ["--predicate", "everything"], ["unknown predicate 'everything'"]),
    ("explore", ["--predicate", "batchnorm"], ["predicate 'batchnorm' selects no module"]),
    ("explore", ["--eval-samples", "20000"], ["too few", "search=20000"]),
    ("explore", ["--batch-size", "0"], ["batch-size", "positive"]),
    ("explore", ["--pop-size", "0"], ["pop-size", "positive"]),
    ("explore", ["--generations", "-1"], ["generations", "positive"]),
    ("explore", ["--calib-batches", "0"], ["calib-batches", "positive"]),
    ("explore", ["--cost", "flops"], ["unknown cost 'flops'"]),
    ("explore", ["--search-space", "everything"], ["search-space", "everything"]),
    ("explore", ["--metric", "accurracy"], ["unknown metric 'accurracy'"]),
    ("explore", ["--device", "tpu"], ["device", "tpu"]),
    ("explore", ["--calib-method", "kl"], ["unknown calibration method 'kl'"]),
    ("explore", ["--algorithm", "annealing"], ["unknown algorithm 'annealing'"]),
    ("explore", ["--budget", "0"], ["budget", "positive"]),
    ("explore", ["--budget", "5", "--eval-samples", "500", "--holdout-samples", "100"],
     ["budget 5 is below the", "full evaluations that the uniform baselines take"]),
    ("explore", ["--sensitivity", "hessian"], ["unknown sensitivity 'hessian'"]),
    ("explore", ["--patience", "-1"], ["patience", ">= 0"]),
    ("explore", ["--min-gain", "1.5"], ["min-gain", "[0, 1)"]),
    ("explore", ["--early-reject", "--metric", "kl"], ["early-reject", "kl"]),
    ("explore", ["--early-reject", "sometimes"], ["early-reject", "sometimes"]),
    ("explore", ["--calibration", "/nonexistent/calibration.json"], ["calibration file", "does not exist"]),
    ("explore", ["--calibration", "{calibration}"], ["calibration file", "not a quantsearch calibration file"]),
    ("explore", ["--resume", "/nonexistent/run"], ["holds no run store"]),
    ("explore", ["--resume", "{corrupt}"], ["corrupt"]),
    ("explore", ["--resume", "{truncated}"], ["corrupt"]),
    ("explore", ["--resume", "{held}", "--bits", "4:8"], ["--resume takes the run's stored settings", "--bits"]),
    ("explore", ["--out", "{held}"], ["already holds a run", "--resume"]),
    ("explore", ["--workers", "-2"], ["workers", "non-negative"]),
    ("explore", ["--ray-address", "auto"], ["ray-address", "--workers"]),
    ("apply", ["/nonexistent/point.json"], ["cannot read bit-config"]),
    ("apply", ["{point}"], ["point.json", "bit-config schema", "'model' is a required property"]),
    ("calibrate", ["--output", "c.json", "--bits", "9:2"], ["LO is greater than HI"]),
]


def _command(entry: str, args: list[str], files: dict[str, str], tmp: Path) -> list[str]:
    args = [a.format(**files) for a in args]
    if entry in ("explore", "calibrate") and "--resume" not in args:
        args += [x for flag, value in TINY.items() if flag not in args for x in (flag, value)]
    if entry == "explore" and "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp / "runs" / str(abs(hash(tuple(args)))))]
    if entry == "explore":
        args.append("--no-progress")
    return [sys.executable, "-m", f"quantsearch.{entry}", *args]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's (exit status, stderr), run side by side."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    files = _files(tmp)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def run(case):
        entry, args, _ = case
        proc = subprocess.run(_command(entry, args, files, tmp), cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=600)
        return proc.returncode, proc.stderr

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        out = list(pool.map(run, CASES))
    yield {i: r for i, r in enumerate(out)}, tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _message_lines(stderr: str) -> list[str]:
    """stderr less logging and library warnings: what the user is told."""
    return [line for line in stderr.strip().splitlines()
            if not line.startswith(("INFO", "WARNING")) and "Warning" not in line and line.strip()]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{e} {' '.join(a)}" for e, a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(results, index):
    (code, stderr), _ = results[0][index], results[1]
    _, _, words = CASES[index]
    lines = _message_lines(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


def test_every_case_is_a_distinct_problem_with_its_own_message(results):
    """No case repeats another, and no two bad inputs get the same message: each one names its own problem."""
    commands = [(entry, tuple(args)) for entry, args, _ in CASES]
    assert len(set(commands)) == len(commands), [c for c in commands if commands.count(c) > 1]
    told = {}
    for index, (_, stderr) in results[0].items():
        told.setdefault(" | ".join(_message_lines(stderr)), []).append(commands[index])
    assert {message: cases for message, cases in told.items() if len(cases) > 1} == {}


def test_the_evil_checkpoint_ran_nothing(results):
    assert not (results[1] / "evil_ran").exists()  # weights_only refused the object before it could run
