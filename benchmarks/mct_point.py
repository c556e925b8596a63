"""One Sony MCT mixed-precision PTQ point of the demo ViT: run by bench_vs_mct.py in MCT's own environment.

    <mct env>/bin/python benchmarks/mct_point.py SPLITS_JSON BOPS_FRACTION

MCT 2.6 (``model-compression-toolkit`` from PyPI, never a dependency of quantsearch) quantizes the demo ViT with a
W+A platform: every Conv/Linear may take weights at 8, 4 or 2 bits and activations at 8 or 4 (the imx500 platform
model with 4-bit activation options added to its mixed-precision list), under a BOPs target of ``BOPS_FRACTION``
of its own W8A8 count (MCT counts the BOPs of Conv/Linear layers only: no attention matmuls). Representative
data: the calibration split of the run whose ``splits.json`` is given, 250 images a batch. The quantized model is
scored on that run's hold-out split against FP32 on the same images. Prints one JSON line last: seconds inside
MCT, seconds for the whole script, hold-out top-1 of FP32 and of the point, and MCT's BOPs of the point and of
W8A8.
"""
from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()

import torch  # noqa: E402


def tpc_w_and_a():
    """imx500 v1.0 with activation options 8 and 4 beside weights 8, 4 and 2 on every Conv/Linear."""
    from model_compression_toolkit.target_platform_capabilities.constants import KERNEL_ATTR, WEIGHTS_N_BITS
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import tpc

    base, _, default = tpc.get_op_quantization_configs()
    both = (8, 4)
    base = base.clone_and_edit(supported_input_activation_n_bits=both)
    default = default.clone_and_edit(supported_input_activation_n_bits=both)
    options = [base.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: w}}, activation_n_bits=a,
                                   simd_size=base.simd_size * 8 // w)
               for w in (8, 4, 2) for a in both]
    return tpc.generate_tpc(default_config=default, base_config=base, mixed_precision_cfg_list=options,
                            name="imx500_w_and_a")


class ImagesOnly(torch.nn.Module):
    """The model with a one-tensor forward: timm's ``forward(x, attn_mask=None)`` traces to two graph inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def plain_attention(self, x, attn_mask=None, is_causal=False):
    """timm's Attention forward for this model (no mask, gate or q/k norm), without the branches on None that
    MCT's graph reader turns into nodes with no tensor."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def top1(model, x, y) -> float:
    with torch.inference_mode():
        return float(sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum() for i in range(0, len(x), 500))
                     / len(x))


def main() -> None:
    import model_compression_toolkit as mct

    from quantsearch.sources.data import load_fashion_mnist
    from quantsearch.sources.models import create_demo_vit

    splits, fraction = json.loads(open(sys.argv[1]).read()), float(sys.argv[2])
    torch.set_num_threads(2)
    data = load_fashion_mnist("test")
    calibration = data.tensors[0][splits["calibration"]]
    held_x, held_y = data.tensors[0][splits["holdout"]], data.tensors[1][splits["holdout"]]
    from timm.layers.attention import Attention

    model = ImagesOnly(create_demo_vit()).eval()
    with torch.inference_mode():
        timm_logits = model(held_x[:500])
        Attention.forward = plain_attention
        assert torch.allclose(model(held_x[:500]), timm_logits, atol=1e-5), "plain attention differs from timm's"
    fp32 = top1(model, held_x, held_y)

    def representative():
        for i in range(0, len(calibration), 250):
            yield [calibration[i:i + 250]]

    tpc = tpc_w_and_a()
    clock = time.perf_counter()
    full = mct.core.pytorch_resource_utilization_data(model, representative, mct.core.CoreConfig(), tpc)
    target = mct.core.ResourceUtilization(bops=fraction * full.bops)
    config = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig())
    quantized, _ = mct.ptq.pytorch_post_training_quantization(
        model, representative, target_resource_utilization=target, core_config=config,
        target_platform_capabilities=tpc)
    inside = time.perf_counter() - clock
    accuracy = top1(quantized.eval(), held_x, held_y)
    print(json.dumps({"mct_seconds": inside, "script_seconds": time.perf_counter() - START, "fp32_holdout": fp32,
                      "holdout": accuracy, "bops_target": float(target.bops), "bops_w8a8_mct": float(full.bops),
                      "mct_version": mct.__version__}))


if __name__ == "__main__":
    main()
