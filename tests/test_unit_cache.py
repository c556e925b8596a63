"""The block-output cache (issue 27): a later configuration that shares the widths up to a block reuses that
block's output, bit for bit; what a block depends on; the byte budget; and nothing cached outside evaluation."""
import math

import pytest
import torch

from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.search.unit_cache import UnitOutputCache
from quantsearch.sources.models import create_demo_vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    qmodel = QuantizedActivationsModel(create_demo_vit().eval(), "vit")
    batches = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    qmodel.calibrate(batches)
    return qmodel, batches


def _outputs(qmodel, batches, bits):
    qmodel.bit_widths = bits
    with torch.inference_mode():
        return [qmodel(x) for x in batches]


def test_a_block_depends_on_the_quantizers_that_run_before_it_ends(vit):
    qmodel, batches = vit
    cache = UnitOutputCache(qmodel, batches[0], 1 << 30)
    names = qmodel.quantizer_names
    assert [n for n, _ in cache.blocks] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    first = {names[i] for i in cache.prefixes[0]}
    assert {"input", "patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc2"} <= first
    assert not any(n.startswith(("blocks.1", "blocks.2", "head", "norm")) for n in first)
    assert all(set(a) < set(b) for a, b in zip(cache.prefixes, cache.prefixes[1:]))
    assert not any(names[i].startswith(("head", "norm")) for i in cache.prefixes[-1])


def test_cached_outputs_are_bit_identical_and_skip_the_shared_blocks(vit):
    qmodel, batches = vit
    names = qmodel.quantizer_names
    top = [8] * len(names)
    late = [4 if n.startswith(("blocks.3", "norm", "head")) else 8 for n in names]  # after block 2 ends
    early = [4 if n == "input" else 8 for n in names]
    expected = {tuple(b): _outputs(qmodel, batches, b) for b in (top, late, early)}
    cache = UnitOutputCache(qmodel, batches[0], 1 << 30)
    with cache.active():
        for bits in (top, late, early, late):
            assert all(torch.equal(a, b) for a, b in zip(_outputs(qmodel, batches, bits), expected[tuple(bits)]))
        calls, hits, skipped = cache.calls, cache.hits, cache.skipped
        with torch.enable_grad():  # a backward pass (gradient sensitivity) never reads or fills the cache
            qmodel(batches[0].requires_grad_(False))
        assert (cache.calls, cache.hits, cache.skipped) == (calls, hits, skipped)
    # top: computed; late: blocks 0-2 from top (block 2 answered, 0-1 skipped); early: computed; late again:
    # block 3 answered, 0-2 skipped; 2 batches each
    assert (hits, skipped) == (2 * 2, 2 * (2 + 3))
    assert calls == 4 * 4 * 2
    assert not any("forward" in m.__dict__ for _, m in cache.blocks) and not cache.entries
    assert all(torch.equal(a, b) for a, b in zip(_outputs(qmodel, batches, late), expected[tuple(late)]))


def test_the_budget_bounds_what_it_holds(vit):
    qmodel, batches = vit
    names = qmodel.quantizer_names
    probe = UnitOutputCache(qmodel, batches[0], 1 << 30)
    with probe.active():
        _outputs(qmodel, batches, [8] * len(names))
        one = probe.bytes // len(probe.entries)  # a block's output for one batch
        assert len(probe.entries) == 8 and one == 8 * math.prod(probe.shapes[0]) * 4  # 8 images of float32
    cache = UnitOutputCache(qmodel, batches[0], 3 * one)
    with cache.active():
        for width in (8, 7, 6):
            _outputs(qmodel, batches, [width] * len(names))
            assert len(cache.entries) == 3 and cache.bytes == 3 * one
    assert cache.hits == 0


def test_a_run_with_the_cache_evaluates_exactly_as_one_without(tmp_path, capsys):
    """explore with and without the cache: the same evaluations (accuracy, status, images) and front; run.json
    says how many block calls the cache answered; a negative budget is refused in one line."""
    import csv
    import json

    from quantsearch.cli.explore import main as explore_main

    small = ["--eval-samples", "300", "--holdout-samples", "200",
             "--calib-batches", "1", "--batch-size", "100", "--no-progress", "--log-level", "WARNING"]
    runs = {}
    for label, flags in (("on", []), ("off", ["--block-cache-mb", "0"])):
        assert explore_main([*small, *flags, "--out", str(tmp_path / label)]) == 0
        runs[label] = json.loads((tmp_path / label / "run.json").read_text())
        with (tmp_path / label / "evaluations.csv").open() as f:
            runs[label]["rows"] = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    assert runs["on"]["rows"] == runs["off"]["rows"] and runs["on"]["front"] == runs["off"]["front"]
    stats = runs["on"]["search"]["block_cache"]
    assert stats["hits"] > 0 and 0 < stats["hit_rate"] < 1 and "block_cache" not in runs["off"]["search"]
    capsys.readouterr()
    assert explore_main([*small, "--block-cache-mb", "-1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: block-cache-mb must be a whole number of MiB >= 0 (0: off), got -1"]
    assert not (tmp_path / "bad").exists()


def test_an_output_answered_from_outlives_newer_ones_never_reused(vit):
    """Over budget, entries never answered from go first: block 2's output, reused once, survives three
    configurations that recompute every block, and answers again (plain LRU would have evicted it)."""
    qmodel, batches = vit
    names = qmodel.quantizer_names
    one_batch = batches[:1]
    probe = UnitOutputCache(qmodel, one_batch[0], 1 << 30)
    with probe.active():
        _outputs(qmodel, one_batch, [8] * len(names))
        one = probe.bytes // len(probe.entries)
    top = [8] * len(names)
    late = [[w if n.startswith(("blocks.3", "norm", "head")) else 8 for n in names] for w in (4, 5)]
    cache = UnitOutputCache(qmodel, one_batch[0], 4 * one)
    with cache.active():
        for bits in (top, late[0]):  # block 2 of top answers late[0]
            _outputs(qmodel, one_batch, bits)
        assert cache.hits == 1
        for width in (7, 6, 5):  # every block recomputed, four new entries each
            _outputs(qmodel, one_batch, [width if n == "input" else 8 for n in names])
        _outputs(qmodel, one_batch, late[1])
        assert cache.hits == 2 and cache.skipped == 4  # block 2 answered again; blocks 0-1 skipped twice
