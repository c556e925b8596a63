"""explore --target onnxruntime-cpu end to end on the demo ViT and real Fashion-MNIST images, then apply of a front
point: formats as genes, latency and size as costs, the front deployed and timed in ONNX Runtime, format configs
that re-apply and export the runtime's own graph, and bad input refused in one line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from quantsearch.cli import apply as apply_cli  # noqa: E402
from quantsearch.cli import explore as explore_cli  # noqa: E402
from quantsearch.run.settings import ConfigError, ExploreConfig  # noqa: E402

SMALL = ["--eval-samples", "500", "--holdout-samples", "1000", "--calib-batches", "1", "--pop-size", "4",
         "--generations", "1", "--no-progress", "--log-level", "WARNING"]


@pytest.mark.parametrize("settings, message", [
    ({"target": "tensorrt"}, "unknown target 'tensorrt'; choose from onnxruntime-cpu"),
    ({"target": "onnxruntime-cpu", "cost": "bops"}, "unknown cost of target onnxruntime-cpu 'bops'; choose from "
                                                    "latency, size"),
    ({"cost": "latency"}, "unknown cost 'latency'; choose from bits, activation-memory, model-size, bops"),
    ({"threads": 2}, "threads is a setting of a deployment target"),
    ({"target": "onnxruntime-cpu", "quant_forms": {"*": "log2"}}, "quant-forms describes fake quantizers"),
    ({"target": "onnxruntime-cpu", "deploy_batch": 0}, "deploy-batch must be a positive integer, got 0"),
    ({"target": "onnxruntime-cpu", "latency_table": "/nonexistent.json"}, "latency table /nonexistent.json does "
                                                                           "not exist"),
    ({"target": "onnxruntime-cpu", "sensitivity": "gradient"}, "use measured"),
])
def test_target_settings_are_checked_before_anything_loads(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExploreConfig(**settings).validate()
    assert ExploreConfig(target="onnxruntime-cpu").cost_names == "latency" and ExploreConfig().cost_names == "bits"


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    import os

    folder = tmp_path_factory.mktemp("target")
    os.environ["XDG_CACHE_HOME"] = str(folder / "cache")  # the latency cache stays in the test's folder
    try:
        code = explore_cli.main(["--target", "onnxruntime-cpu", "--cost", "latency,size", "--out",
                                 str(folder / "run"), *SMALL])
    finally:
        del os.environ["XDG_CACHE_HOME"]
    assert code == 0
    return folder / "run"


def test_a_target_run_deploys_its_front_and_ort_baselines_in_onnx_runtime(target_run):
    summary = json.loads((target_run / "run.json").read_text())
    rows = summary["deployed"]["rows"]
    assert {"FP32", "ORT dynamic int8", "ORT static int8", "uniform int8-static", "uniform int8-dynamic",
            "uniform int4-weight"} <= set(rows)
    front = summary["front"]
    assert front and set(summary["deployed"]["points"]) == {f"point {i}" for i in range(len(front))}
    for i, point in enumerate(front):
        row = rows[f"point {i}"]
        assert row["predicted_ms"] == pytest.approx(point["costs"]["latency"])  # the table's sum, as searched
        assert row["measured_ms"] > 0 and row["file_bytes"] > 0
        # the kernels a default session runs are the formats the point chose: one per non-fp32 Linear
        formats = json.loads((target_run / "pareto" / f"point_{i:03d}.json").read_text())["layers"]
        assert row["integer_kernels"].get("DynamicQuantizeMatMul", 0) == list(formats.values()).count("int8-dynamic")
        assert row["integer_kernels"].get("MatMulNBits", 0) == list(formats.values()).count("int4-weight")
        # the simulation is the runtime: hold-out within one image in a thousand of ORT's own answer
        assert abs(row["holdout"] - point["accuracy_holdout"]) <= 1e-3
    assert rows["uniform int4-weight"]["integer_kernels"] == {"MatMulNBits": 17}  # the patch Conv stays fp32
    assert rows["FP32"]["integer_kernels"] == {}
    # guided search measured the formats that save time (int4-weight, slower than fp32 on these small layers, is
    # no reason to skip a layer); whether any does on this tiny model at batch 1 is the machine's to say (a loaded
    # machine can time every format slower than fp32), so the test reads the run's own table
    table = json.loads((target_run / "latency_table.json").read_text())["layers"]
    saving = any(v[f] < v["fp32"] for v in table.values() for f in v if f != "fp32")
    assert (summary["search"]["details"]["sensitivity_measurements"] > 0) == saving
    with open(target_run / "pareto.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["blocks.0.mlp.fc1"] in ("int4-weight", "int8-dynamic", "int8-static", "fp32")
    assert float(table[0]["latency_measured_ms"]) == pytest.approx(rows["point 0"]["measured_ms"], rel=1e-3)
    report = (target_run / "report.md").read_text()
    assert "## Deployed in ONNX Runtime (measured)" in report and "### Format of each layer" in report
    assert (target_run / "pareto.png").stat().st_size > 0 and not (target_run / "bits_heatmap.png").exists()


def test_a_format_config_reapplies_and_exports_the_runtime_graph(target_run, tmp_path, capsys):
    from quantsearch import create_model
    from quantsearch.deploy.bitconfig import apply_bitconfig
    from quantsearch.deploy.targets.onnxruntime import export_runtime_onnx

    point = target_run / "pareto" / "point_000.json"
    onnx_path = tmp_path / "p0.onnx"
    assert apply_cli.main([str(point), "--export", str(onnx_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "ONNX Runtime's own graph; a default session runs" in out
    # one line from the JSON to the model ORT runs, on any model of that architecture
    rmodel = apply_bitconfig(create_model("fashion-vit").eval(), point)
    recorded = json.loads(point.read_text())["layers"]
    assert rmodel.formats == recorded
    x = torch.randn(3, 1, 28, 28)
    export_runtime_onnx(rmodel, tmp_path / "again.onnx", x[:1])
    session = ort.InferenceSession(str(onnx_path))  # a plain default session loads what apply wrote
    ours = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(3)])
    rmodel.evaluate_in = "onnxruntime"
    with torch.no_grad():
        assert np.allclose(ours, rmodel(x).numpy(), atol=1e-5)


def test_bad_target_input_is_one_line_and_writes_nothing(target_run, tmp_path, capsys):
    payload = json.loads((target_run / "pareto" / "point_000.json").read_text())
    payload["layers"]["patch_embed.proj"] = "int4-weight"  # a Conv: ORT has no 4-bit weight-only conv
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    assert apply_cli.main([str(bad), "--export", str(tmp_path / "bad.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "layer 'patch_embed.proj': format index 0 is not one of 2..3" in err
    assert not (tmp_path / "bad.onnx").exists()
    table = json.loads((target_run / "run.json").read_text())["deployed"]["machine"]
    other = tmp_path / "table.json"
    other.write_text(json.dumps({"version": 3, "formats": ["int4-weight", "int8-dynamic", "int8-static", "fp32"],
                                 "machine": table | {"cpu": "Another CPU"}, "batch_size": 1, "fixed": 0.0,
                                 "layers": {"head": {"fp32": 1e-5}}}))
    code = explore_cli.main(["--target", "onnxruntime-cpu", "--latency-table", str(other), "--out",
                             str(tmp_path / "never"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "measured with cpu 'Another CPU'" in err
    assert not (tmp_path / "never").exists()


def test_a_resumed_target_run_costs_with_its_own_latency_table(target_run, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(target_run, copy)
    table = json.loads((copy / "latency_table.json").read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # nothing cached: only the run's table
    assert explore_cli.main(["--resume", str(copy), "--no-progress", "--log-level", "WARNING"]) == 0
    before = json.loads((target_run / "run.json").read_text())
    after = json.loads((copy / "run.json").read_text())
    assert [p["costs"] for p in after["front"]] == [p["costs"] for p in before["front"]]
    assert json.loads((copy / "latency_table.json").read_text()) == table
    assert not (tmp_path / "empty-cache").exists()  # nothing was measured layer by layer again


def test_the_notebook_runs_on_a_target_run(target_run):
    """The analysis notebook on a target run: formats instead of bits in its sensitivity and its pick, a format
    config re-applied to its recorded value, and the runtime's own graph written and timed against FP32."""
    from conftest import execute_notebook

    notebook = execute_notebook({"QUANTSEARCH_RUN_DIR": str(target_run), "QUANTSEARCH_SENSITIVITY_SAMPLES": "100",
                                 "XDG_CACHE_HOME": str(target_run.parent / "cache")})
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "formats int4-weight, int8-dynamic, int8-static, fp32 (onnxruntime-cpu)" in text
    assert "drop at int8-dynamic" in text and "layers at the top of their range" in text
    assert "x FP32's speed" in text and (target_run / "export" / "chosen.onnx").is_file()
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
