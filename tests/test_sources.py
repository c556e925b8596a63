"""Model sources (timm with its local cache, torchvision, callables, checkpoints) and data sources (images,
imagefolder with class indices, callables, Fashion-MNIST resized), each on small real inputs."""
import json
import sys

import pytest
import torch
from conftest import write_fashion_pngs
from torch import nn

from quantsearch.sources.data import (DataError, Preprocessing, load_dataset, load_fashion_mnist, read_class_index,
                              split_dataset)
from quantsearch.search.evaluator import AccuracyEvaluator
from quantsearch.cli.explore import main
from quantsearch.sources.models import ModelError, create_model, load_checkpoint, model_preprocessing


def _same_weights(a: nn.Module, b: dict) -> bool:
    own = a.state_dict()
    return own.keys() == b.keys() and all(torch.equal(own[k], b[k]) for k in own)


def _fake_hf_cache(root, repo: str, state: dict) -> None:
    """The layout huggingface_hub leaves behind after a download: refs/main -> snapshots/<commit>/file."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    (base / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(base / "snapshots" / commit / "model.safetensors"))


# -- model sources -----------------------------------------------------------------------------------------------
def test_timm_pretrained_weights_come_from_the_local_cache_offline(tmp_path, monkeypatch):
    import timm

    torch.manual_seed(3)
    published = timm.create_model("test_vit").state_dict()  # stands in for the hub's file
    _fake_hf_cache(tmp_path, "timm/test_vit.r160_in1k", published)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model("test_vit", pretrained=True)
    assert _same_weights(model, published)
    assert not model.training
    # the preprocessing comes from timm's pretrained config, and can be overridden
    pre = model_preprocessing(model)
    assert pre == Preprocessing((3, 160, 160), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.95, "center")
    assert model_preprocessing(model, {"input_size": 128, "crop_pct": 1.0}).input_size == (3, 128, 128)


def test_timm_weights_missing_offline_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not available locally and HF_HUB_OFFLINE is set"):
        create_model("test_vit", pretrained=True)
    code = main(["--model", "test_vit", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any run directory was made


def test_checkpoint_key_nested_module_prefix_and_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    trained = timm.create_model("test_vit").state_dict()
    wrapped = {f"module.{k}": v for k, v in trained.items()}  # saved from DistributedDataParallel
    torch.save({"epoch": 7, "model": wrapped, "ema": {"state": trained}}, tmp_path / "ckpt.pth")
    for key in (None, "model", "ema.state"):
        model = create_model("test_vit", checkpoint=tmp_path / "ckpt.pth", checkpoint_key=key)
        assert _same_weights(model, trained), key
    with pytest.raises(ModelError, match="no entry 'optimizer'.*top-level keys: ema, epoch, model"):
        load_checkpoint(tmp_path / "ckpt.pth", "optimizer")
    save_file(trained, str(tmp_path / "weights.safetensors"))
    assert _same_weights(create_model("test_vit", checkpoint=tmp_path / "weights.safetensors"), trained)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ModelError, match="does not fit test_vit"):
        create_model("test_vit", checkpoint=tmp_path / "other.pth")


def test_torchvision_name_loads_published_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import squeezenet1_1

    torch.manual_seed(9)
    published = squeezenet1_1().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(published, tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model("torchvision:squeezenet1_1", pretrained=True)
    assert _same_weights(model, published)
    # torchvision's own transforms for these weights: resize 256, crop 224, bilinear, ImageNet statistics
    assert model_preprocessing(model) == Preprocessing((3, 224, 224), (0.485, 0.456, 0.406),
                                                       (0.229, 0.224, 0.225), "bilinear", 224 / 256, "center")
    random = create_model("torchvision:squeezenet1_1", pretrained=False)
    assert not _same_weights(random, published)
    with pytest.raises(ModelError, match="not in the local cache"):
        create_model("torchvision:resnet18", pretrained=True)
    with pytest.raises(ModelError, match="unknown torchvision model 'resnet19'.*resnet18"):
        create_model("torchvision:resnet19")


def test_callable_model_with_keyword_arguments_and_grey_preprocessing(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import timm\n"
        "def small_resnet(width=8, num_classes=10):\n"
        "    return timm.create_model('test_resnet', in_chans=1, num_classes=num_classes)\n"
        "def not_a_model():\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("my_models:small_resnet", num_classes=7)
    assert model.get_classifier().out_features == 7
    pre = model_preprocessing(model)  # timm's config of the architecture, made grey for a 1-channel stem
    assert pre.input_size == (1, 160, 160) and len(pre.mean) == 1
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        create_model("my_models:not_a_model")
    with pytest.raises(ModelError, match="unexpected keyword argument 'depth'"):
        create_model("my_models:small_resnet", depth=3)
    sys.modules.pop("my_models", None)


# -- data sources ------------------------------------------------------------------------------------------------
def test_unlabeled_image_folder_reproduces_the_shipped_tensors(tmp_path, demo_vit):
    order = write_fashion_pngs(tmp_path / "photos", 30)
    dataset = load_dataset(f"images:{tmp_path / 'photos'}", model_preprocessing(demo_vit))
    x_ref, _ = load_fashion_mnist().tensors
    assert len(dataset) == 30
    for k in (0, 13, 29):
        x, label = dataset[k]
        assert label == -1
        torch.testing.assert_close(x, x_ref[order[k]], atol=1e-6, rtol=0)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"images:{tmp_path / 'empty'}")


def test_imagefolder_labels_from_folders_and_from_a_class_index(tmp_path, demo_vit):
    root = tmp_path / "fashion"
    order = write_fashion_pngs(root, 60, by_class=True)
    pre = model_preprocessing(demo_vit)
    x_ref, y_ref = load_fashion_mnist().tensors
    folders = sorted(p.name for p in root.iterdir())
    by_folder = load_dataset(f"imagefolder:{root}", pre)
    assert sorted(set(by_folder.labels)) == list(range(len(folders)))  # sorted folder names -> 0..K-1
    # the real Fashion-MNIST indices, in each supported file format
    names = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    (tmp_path / "index.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    (tmp_path / "keras.json").write_text(json.dumps({str(i): [n, n.lower()] for i, n in enumerate(names)}))
    (tmp_path / "index.txt").write_text("\n".join(f"{n.replace(' ', '_')} a description" for n in names))
    assert read_class_index(tmp_path / "index.json") == read_class_index(tmp_path / "keras.json")
    dataset = load_dataset(f"imagefolder:{root}", pre, class_index=tmp_path / "index.json")
    files = [str(f) for f in dataset.files]
    by_path = dict(zip(sorted(files), order))
    assert [dataset.labels[i] for i in range(60)] == [int(y_ref[by_path[f]]) for f in files]
    # the demo's top-1 on the files equals its top-1 on the shipped tensors of the same images
    on_files = AccuracyEvaluator(dataset, batch_size=20)(demo_vit)
    idx = [by_path[f] for f in files]
    on_tensors = AccuracyEvaluator(torch.utils.data.TensorDataset(x_ref[idx], y_ref[idx]), batch_size=20)(demo_vit)
    assert on_files == on_tensors > 0.7
    with pytest.raises(DataError, match="class folder 'Ankle boot' .* is not in the class index"):
        load_dataset(f"imagefolder:{root}", pre, class_index=tmp_path / "index.txt")  # underscores there


def test_callable_dataset_gets_the_model_preprocessing(tmp_path, monkeypatch):
    write_fashion_pngs(tmp_path / "imgs", 12)
    (tmp_path / "my_data.py").write_text(
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "class Photos:\n"
        "    def __init__(self, root, transform=None):\n"
        "        self.files, self.transform = sorted(Path(root).rglob('*.png')), transform\n"
        "    def __len__(self):\n"
        "        return len(self.files)\n"
        "    def __getitem__(self, i):\n"
        "        return self.transform(Image.open(self.files[i]).convert('RGB')), i % 2\n"
        "def photos(root, transform=None):\n"
        "    return Photos(root, transform)\n"
        "def raw(root):\n"
        "    return Photos(root, lambda image: image)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pre = Preprocessing((3, 48, 48), (0.5,) * 3, (0.5,) * 3)
    dataset = load_dataset("my_data:photos", pre, root=str(tmp_path / "imgs"))
    x, y = dataset[3]
    assert x.shape == (3, 48, 48) and y == 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # a grey image made RGB
    with pytest.raises(DataError, match="yields Image items, not tensors"):
        load_dataset("my_data:raw", pre, root=str(tmp_path / "imgs"))
    sys.modules.pop("my_data", None)


def test_fashion_mnist_resized_for_an_rgb_model_and_disjoint_seeded_splits():
    pre = Preprocessing((3, 64, 64), (0.5,), (0.25,), "bilinear", 1.0)
    dataset = load_dataset("fashion-mnist", pre)
    x, y = dataset[0]
    assert x.shape == (3, 64, 64) and y == int(load_fashion_mnist().tensors[1][0])
    assert float(x.min()) == pytest.approx(-2.0)  # background 0 -> (0 - 0.5) / 0.25
    s = split_dataset(dataset, 100, 200, 300, seed=4)
    parts = s.indices()
    assert sum(map(len, parts.values())) == len(set().union(*map(set, parts.values()))) == 600
    assert split_dataset(dataset, 100, 200, 300, seed=4).fingerprint() == s.fingerprint()
    assert split_dataset(dataset, 100, 200, 300, seed=5).fingerprint() != s.fingerprint()


def test_bad_sources_exit_2_with_one_line(tmp_path, capsys):
    write_fashion_pngs(tmp_path / "photos", 12)
    (tmp_path / "bad.yaml").write_text("preprocessing: {size: 224}\n")
    cases = [
        (["--metric", "miou"], "unknown metric 'miou'"),
        (["--dataset", "nowhere"], "unknown dataset 'nowhere'"),
        (["--dataset", f"images:{tmp_path / 'missing'}"], "is not a directory"),
        (["--config", str(tmp_path / "bad.yaml")], "preprocessing: unknown key 'size'"),
        (["--class-index", str(tmp_path / "none.json")], "class index"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--loader-workers", "-1"], "CUDA" if not
         torch.cuda.is_available() else "loader-workers"),
        # the demo on unlabeled images: top-1 needs labels, and the run says which metrics do not
        (["--dataset", f"images:{tmp_path / 'photos'}", "--calib-batches", "1", "--batch-size", "4",
          "--eval-samples", "4"], "top1 needs labels"),
    ]
    for args, message in cases:
        code = main([*args, "--out", str(tmp_path / "run"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.startswith("error: ") and "Traceback" not in err, (args, err)
    assert not (tmp_path / "run").exists()
