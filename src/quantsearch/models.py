"""Model sources: the embedded demo ViT, timm names, ``package.module:callable`` factories, and checkpoints.

Checkpoints are always read with ``torch.load(..., weights_only=True)``: a state dict is data, never code.
"""
from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "DEMO_MODEL",
    "ModelError",
    "create_demo_vit",
    "create_model",
    "load_checkpoint",
]

DEMO_MODEL = "fashion-vit"
DEMO_WEIGHTS = "fashion_vit.pt"


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
    if pretrained:
        weights = resources.files("quantsearch") / "data" / DEMO_WEIGHTS
        with resources.as_file(weights) as path:
            if not path.is_file():
                raise ModelError(f"demo weights {path} are missing: run utils/train_demo.py")
            model.load_state_dict(load_checkpoint(path))
    return model.eval()


def _from_callable(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's spec, reported in one line
        raise ModelError(f"cannot import module {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r} (model {spec!r})")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create_model(spec: str = DEMO_MODEL, checkpoint: str | Path | None = None, pretrained: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Build a model by name, like ``timm.create_model``, in eval mode.

    ``spec`` is ``fashion-vit`` (the embedded demo), a timm model name, or ``package.module:callable``.
    """
    if spec == DEMO_MODEL:
        model = create_demo_vit(pretrained=checkpoint is None)
    elif ":" in spec:
        model = _from_callable(spec, kwargs)
    else:
        import timm

        if not timm.is_model(spec):
            close = timm.list_models(f"*{spec[:6]}*")[:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ModelError(f"unknown model {spec!r}: not a timm model name nor module:callable{hint}")
        model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        missing, unexpected = _fit(model, state)
        if missing or unexpected:
            raise ModelError(
                f"checkpoint {checkpoint} does not fit {spec}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.load_state_dict(state)
    return model.eval()


def load_checkpoint(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (weights only), unwrapped from ``{key: ...}`` and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path} as weights: {str(exc).splitlines()[0]}") from None
    for k in ([key] if key else ["state_dict", "model", "model_state_dict"]):
        if isinstance(state, dict) and isinstance(state.get(k), dict):
            state = state[k]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    return missing + [f"{k} (shape)" for k in wrong], unexpected
