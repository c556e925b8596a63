"""The run's figures: an empty front says so and warns about nothing; every baseline is in view or marked at the
edge with its value (issue 28, items 8 and 9)."""
import warnings

import pytest

from quantsearch.run.plots import plot_bits_heatmap, plot_front, plot_holdout, plot_sensitivity
from quantsearch.search.bound import Bound
from quantsearch.search.problem import Evaluation


def evaluation(accuracy, cost, bits=(4, 4), status="ok"):
    return Evaluation(bits, accuracy, {"bops": cost}, 0.1, status)


def texts(ax):
    return [t.get_text() for t in ax.texts]


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (matplotlib's UserWarnings included) fails the test
        yield


def test_an_empty_front_says_so_in_every_figure_and_warns_about_nothing(tmp_path, no_warnings):
    # as the swin_tiny run: everything evaluated, nothing above the floor
    evaluated = [evaluation(0.30 + 0.01 * i, 0.2 + 0.05 * i) for i in range(10)]
    bound = Bound(0.90, metric="agreement")
    ax = plot_front(evaluated, [], "bops", {"W8A8": evaluated[-1]}, 0.95, bound, path=tmp_path / "pareto.png")
    assert any("empty front" in t and "floor" in t for t in texts(ax))
    ax = plot_bits_heatmap([], ["input", "blocks.0.attn.qkv", "head"], "bops", path=tmp_path / "bits_heatmap.png")
    assert any("empty front" in t for t in texts(ax))
    assert not ax.images  # no image of zero columns (identical x limits)
    ax = plot_holdout([], {}, {"search": 0.95, "holdout": 0.94}, path=tmp_path / "holdout.png")
    assert any("no Pareto point" in t for t in texts(ax)) and ax.get_legend() is None
    for name in ("pareto.png", "bits_heatmap.png", "holdout.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_an_empty_front_without_any_ok_evaluation_still_plots(tmp_path, no_warnings):
    failed = [evaluation(0.0, 0.3, status="failed"), evaluation(0.1, 0.4, status="rejected")]
    ax = plot_front(failed, [], "bops", None, None, Bound(0.5), path=tmp_path / "pareto.png")
    assert any("2 evaluated" in t for t in texts(ax))
    plot_sensitivity(["a", "b"], {}, path=tmp_path / "sensitivity.png")


def test_a_front_of_points_draws_no_empty_front_message(tmp_path, no_warnings):
    points = [evaluation(0.90, 0.3, (3, 3)), evaluation(0.91, 0.5, (5, 5))]
    ax = plot_front(points, points, "bops", None, 0.92, Bound(0.89), path=tmp_path / "pareto.png")
    assert not any("empty front" in t for t in texts(ax))
    ax = plot_bits_heatmap(points, ["a", "b"], "bops", path=tmp_path / "bits_heatmap.png")
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == (2, 2)


def _in_view_or_marked(ax, label, value, unit="%"):
    """The baseline's square inside the y-range, or a label at the edge that names it and gives its value."""
    low, high = sorted(ax.get_ylim())
    if low <= value <= high:
        return any(t == label for t in texts(ax))
    return any(t.startswith(f"{label} {value:.4g}{unit}") and "range" in t for t in texts(ax))


def test_every_baseline_is_in_view_or_marked_at_the_edge_with_its_value(tmp_path, no_warnings):
    # the demo BOPs run: FP32 89.77 %, floor 1 point below, W4A4 at 84.43 % (below the old y-range's 85.77)
    fp32, floor = 0.8977, 0.8877
    searched = [evaluation(0.885 + 0.001 * i, 0.26 + 0.01 * i, (5, 5)) for i in range(12)]
    front = [e for e in searched if e.accuracy >= floor]
    baselines = {"W8A8": evaluation(0.8975, 1.0, (8, 8)), "W4A4": evaluation(0.8443, 0.25, (4, 4)),
                 "W2A2": evaluation(0.1200, 0.0625, (2, 2))}
    ax = plot_front(searched + list(baselines.values()), front, "bops", baselines, fp32, Bound(floor),
                    path=tmp_path / "pareto.png")
    low, high = sorted(ax.get_ylim())
    assert not low <= 84.43 <= high  # the case of the issue: out of view...
    for label, e in baselines.items():  # ... and still shown, with its value
        assert _in_view_or_marked(ax, label, 100 * e.accuracy), (label, texts(ax))
    assert "W4A4 84.43% (below the range)" in texts(ax)
    assert "W8A8" in texts(ax)  # in view: drawn where it is
    # a marker for each edge label, at the bottom edge, at the baseline's cost
    edge = [tuple(p) for c in ax.collections for p in c.get_offsets() if c.get_clip_on() is False]
    assert sorted(edge) == sorted([(0.25, low), (0.0625, low)])


def test_a_lower_is_better_metric_marks_its_baselines_at_the_bottom_of_its_inverted_axis(tmp_path, no_warnings):
    bound = Bound(0.05, higher_is_better=False, metric="kl", fraction=False)
    searched = [evaluation(0.01 + 0.004 * i, 0.3 + 0.05 * i) for i in range(10)]
    front = searched[:3]
    baselines = {"W4A4": evaluation(2.5, 0.25), "W8A8": evaluation(0.002, 1.0)}
    ax = plot_front(searched, front, "bops", baselines, 0.0, bound, path=tmp_path / "pareto.png")
    bottom, top = ax.get_ylim()
    assert bottom > top  # inverted: better is up
    assert _in_view_or_marked(ax, "W4A4", 2.5, unit="") and _in_view_or_marked(ax, "W8A8", 0.002, unit="")
    assert "W4A4 2.5 (below the range)" in texts(ax)
    edge = [tuple(p) for c in ax.collections for p in c.get_offsets() if c.get_clip_on() is False]
    assert edge == [(0.25, bottom)]
