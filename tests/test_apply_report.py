"""From a front to a decision, on a small real run: apply, export, the refusals, the report and the notebook."""
import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NOTEBOOK, assert_real_png, execute_notebook

from timm.models.vision_transformer import VisionTransformer

from quantsearch.cli.apply import main as apply_main
from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.export import ExportError, export_quantized, load_exported, model_state
from quantsearch.sources.models import create_model
from quantsearch.run.record import load_run

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("decision") / "run"
    code = explore_main(["--pop-size", "6", "--generations", "2", "--eval-samples", "400", "--holdout-samples",
                         "400", "--calib-batches", "1", "--bits", "3:8", "--out", str(out), "--no-progress",
                         "--seed", "2"])
    assert code == 0
    return out


def first_point(run_dir: Path) -> Path:
    return sorted((run_dir / "pareto").glob("point_*.json"))[0]


def demo_architecture(embed_dim: int = 64) -> torch.nn.Module:
    """The demo ViT's architecture with random weights."""
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=4,
                             num_heads=4, mlp_ratio=2.0).eval()


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "quantsearch.apply", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def measured(stdout: str) -> dict[str, float]:
    """``{split: correct / images}`` from apply's table (exact: the same division the evaluator makes)."""
    rows = re.findall(r"^\s*(search|holdout)\s+(\d+)\s+(\d+)\s", stdout, flags=re.M)
    return {name: int(correct) / int(images) for name, images, correct in rows}


def test_apply_reproduces_every_recorded_accuracy_exactly(run_dir, capsys):
    points = sorted((run_dir / "pareto").glob("point_*.json"))
    assert points
    for path in points:
        recorded = json.loads(path.read_text())["accuracy"]
        assert apply_main([str(path), "--split", "search", "--check"]) == 0, path.name
        out = capsys.readouterr().out
        assert measured(out) == {"search": recorded["search"]}, path.name
        assert "identical" in out

    # the real command line, both splits, with an export in a torch state dict of tensors
    path = points[-1]
    recorded = json.loads(path.read_text())
    export = run_dir.parent / "chosen.pt"
    proc = cli(path, "--check", "--export", export)
    assert proc.returncode == 0, proc.stderr
    assert measured(proc.stdout) == {"search": recorded["accuracy"]["search"],
                                     "holdout": recorded["accuracy"]["holdout"]}
    assert re.search(rf"^bits\s+{recorded['costs']['bits']:g}\s+", proc.stdout, flags=re.M)

    tensors = torch.load(export, weights_only=True)  # data only: no pickle needed to read it back
    for name, q in recorded["quantizers"].items():
        assert tensors[f"quantizers.{name}.amax"].flatten().tolist() == (
            q["amax"] if isinstance(q["amax"], list) else [q["amax"]])
        assert tensors[f"quantizers.{name}.num_bits"].item() == q["num_bits"]
    metadata = json.loads(export.with_suffix(".json").read_text())
    assert metadata["bitconfig"]["quantizers"] == recorded["quantizers"]
    assert metadata["tensors"]["file"] == "chosen.pt"


def test_export_round_trip_safetensors(run_dir, tmp_path):
    path = first_point(run_dir)
    config = BitConfig.load(path)
    qmodel = apply_bitconfig(create_model("fashion-vit"), config)
    files = export_quantized(qmodel, config, tmp_path / "m.safetensors")
    assert files == (tmp_path / "m.safetensors", tmp_path / "m.json")
    tensors, metadata = load_exported(files[0])
    # random weights: the export alone restores the model's weights and every quantizer
    fresh = demo_architecture()
    fresh.load_state_dict(model_state(tensors))
    rebuilt = apply_bitconfig(fresh, metadata["bitconfig"])
    assert rebuilt.bits_dict() == config.bits and rebuilt.amax == config.amax
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), qmodel(x))
    with pytest.raises(ExportError, match="must end in"):
        export_quantized(qmodel, config, tmp_path / "m.pkl")


def test_bad_bitconfigs_are_refused_in_one_line(run_dir, tmp_path, capsys):
    good = json.loads(first_point(run_dir).read_text())
    names = list(good["quantizers"])
    fc1 = names.index("blocks.0.mlp.fc1")

    def variant(name, edit):
        payload = json.loads(json.dumps(good))
        edit(payload)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(payload))
        return path

    def renamed(p):
        p["quantizers"] = {("blocks.0.mlp.fc9" if k == "blocks.0.mlp.fc1" else k): v
                           for k, v in p["quantizers"].items()}

    cases = [
        (variant("bits", lambda p: p["quantizers"][names[3]].update(num_bits=40)),
         f"violates the bit-config schema at quantizers/{names[3]}/num_bits"),
        (variant("shape_type", lambda p: p["quantizers"]["blocks.1.norm1"].update(shape=[17, -64])),
         "violates the bit-config schema at quantizers/blocks.1.norm1/shape/1"),
        (variant("format", lambda p: p.update(format="something-else")), "violates the bit-config schema at format"),
        (variant("renamed", renamed),
         f"quantizer #{fc1} is 'blocks.0.mlp.fc9' in the bit-config but 'blocks.0.mlp.fc1' in the model"),
        (variant("shape", lambda p: p["quantizers"]["blocks.2.attn.attn_drop"].update(shape=[4, 17, 16])),
         "quantizer 'blocks.2.attn.attn_drop' sees shape [4, 17, 17] per sample in the model but [4, 17, 16]"),
        (variant("missing", lambda p: p["quantizers"].pop(names[-1])),
         f"{len(names) - 1} quantizers in the bit-config, {len(names)} in the model "
         f"(first unmatched: {names[-1]!r})"),
    ]
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"format": ')
    cases += [(bad_json, "is not valid JSON"), (tmp_path / "absent.json", "cannot read bit-config")]

    proc = cli(cases[0][0])  # the real command line once
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and cases[0][1] in proc.stderr and "Traceback" not in proc.stderr
    for path, message in cases[1:]:
        assert apply_main([str(path)]) == 2, path.name
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
        assert message in captured.err, (path.name, captured.err)


def test_same_names_other_shapes_is_refused(run_dir):
    """A narrower ViT has the very same quantizer names: only the recorded shapes tell the two apart."""
    config = json.loads(first_point(run_dir).read_text())
    assert apply_bitconfig(demo_architecture(64), config).quantizer_names == list(config["quantizers"])
    with pytest.raises(BitConfigError, match=r"'patch_embed.proj' sees shape \[32, 4, 4\] per sample in the "
                                             r"model but \[64, 4, 4\] in the bit-config"):
        apply_bitconfig(demo_architecture(32), config)
    # a real batch of another size checks too: 14x14 inputs give 4 tokens + class token, not 17
    with pytest.raises(BitConfigError, match="a forward pass on an input of shape"):
        apply_bitconfig(demo_architecture(64), config, example=torch.zeros(1, 1, 14, 14))


def test_report_and_convergence_of_the_run(run_dir):
    run = load_run(run_dir)
    for name in ("report.md", "convergence.png", "convergence.csv", "holdout.png", "pareto.png", "bits_heatmap.png"):
        assert (run_dir / name).is_file(), name
        if name.endswith(".png"):
            assert_real_png(run_dir / name)
    pareto = list(csv.DictReader((run_dir / "pareto.csv").open()))
    report = (run_dir / "report.md").read_text()
    for section in ("## Settings", "## Baselines", "## Pareto front", "## Convergence", "![Pareto front",
                    "(convergence.png)", "(bits_heatmap.png)"):
        assert section in report, section
    for i, row in enumerate(pareto):  # every front row, with both accuracies and their difference
        search, holdout = 100 * float(row["accuracy_search"]), 100 * float(row["accuracy_holdout"])
        confirmed = "yes" if row["confirmed"] == "1" else "**no**"
        assert f"| {i} | {search:.2f} | {holdout:.2f} | {confirmed} | {holdout - search:+.2f} |" in report

    # convergence against the other views of the run: evaluations.csv per generation, pareto.csv at the end
    evaluations = list(csv.DictReader((run_dir / "evaluations.csv").open()))
    conv = list(csv.DictReader((run_dir / "convergence.csv").open()))
    # generation 0: the baselines; then one row per generation (the guided search's sensitivity steps first)
    assert [int(r["generation"]) for r in conv] == list(range(len(conv))) and len(conv) >= 3
    for row in conv:
        mine = [e for e in evaluations if e["generation"] == row["generation"]]
        assert int(row["evaluations"]) == len(mine)
        assert int(row["feasible"]) == sum(int(e["feasible"]) for e in mine)
    # the last hypervolume is the area under the staircase of every feasible evaluation (baselines outside the
    # search space included), computed here from evaluations.csv alone
    floor, fp32_bits = run.bound.limit, run.fp32_costs["bits"]
    steps = sorted(((float(r["bits"]) / fp32_bits, 100 * (float(r["accuracy"]) - floor))
                    for r in evaluations if r["feasible"] == "1"))
    area, best = 0.0, 0.0
    for (cost, gain), following in zip(steps, [s[0] for s in steps[1:]] + [1.0]):
        best = max(best, gain)
        area += best * (following - cost)
    assert float(conv[-1]["hypervolume"]) == pytest.approx(area, rel=1e-5)
    assert run.convergence().hypervolume[-1] == pytest.approx(area)


def test_notebook_runs_top_to_bottom(run_dir, tmp_path):
    import nbformat

    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in committed.cells if c.cell_type == "code"), "commit it without outputs"
    notebook = execute_notebook({"QUANTSEARCH_RUN_DIR": str(run_dir), "QUANTSEARCH_SENSITIVITY_SAMPLES": "100"})
    saved = tmp_path / "executed.ipynb"
    nbformat.write(notebook, saved)

    outputs = [o for c in nbformat.read(saved, as_version=4).cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 5  # front, hold-out, heatmap, sensitivity, convergence
    for figure in figures:  # each one a real image, not only an entry
        assert_real_png(io.BytesIO(base64.b64decode(figure["data"]["image/png"])))
    text = "".join(o.get("text", "") for o in outputs)
    assert f"all {len(load_run(run_dir).quantizer_names)} quantizers at the top of their range" in text
    assert "on 100 search images" in text and "hold-out" in text and "(target " in text
    assert (run_dir / "export" / "chosen.safetensors").is_file() and (run_dir / "export" / "chosen.json").is_file()


def test_run_session_carries_the_runs_own_calibration(run_dir):
    """The notebook's starting point: the session rebuilt from the run uses the run's calibration.json (every
    width's amax, not one bit-config's), and reproduces the run's FP32 accuracy on the same images."""
    from quantsearch.quantize.calib import Calibration

    run = load_run(run_dir)
    session = run.session()
    calibration = Calibration.load(run_dir / "calibration.json")
    assert session.qmodel.amax_table == calibration.amax_table
    assert {n: session.qmodel.unsigned[n] for n in calibration.unsigned} == calibration.unsigned
    assert session.fp32("search") == run.fp32_accuracy["search"]
    assert session.fp32("holdout") == run.fp32_accuracy["holdout"]
    # a width the run searched gets the amax calibrated for that width
    name = run.quantizer_names[1]
    session.qmodel.bit_widths = {name: 4}
    assert session.qmodel.amax[name] == calibration.amax_table[name][4]
