"""Every example in configs/ is documented and valid: its keys exist and its values pass validation (with the
dataset pointed at a real folder and the device at the CPU, the two things that depend on the machine)."""
from pathlib import Path

import pytest

from quantsearch.run.settings import ConfigError, ExploreConfig, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_four_examples_are_there():
    assert {p.name for p in CONFIGS} >= {"fashion_vit_demo.yaml", "resnet18_imagefolder.yaml",
                                         "efficientnet_lite0_agreement.yaml", "deit_imagenet_gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_is_documented_and_valid(path, tmp_path):
    assert path.read_text().startswith("#"), "each example opens with a comment saying what it does"
    values = load_yaml(path)
    config = ExploreConfig.from_mapping(values, source=str(path))
    kind = config.dataset.partition(":")[0]
    overrides = {"device": "cpu"}
    if kind in ("imagefolder", "images"):
        overrides["dataset"] = f"{kind}:{tmp_path}"
    config.merged(overrides).validate()
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="no CUDA device"):
                config.merged({k: v for k, v in overrides.items() if k != "device"}).validate()
