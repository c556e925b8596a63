"""The run report: ``report.md`` with its figures, from the run's :class:`~quantsearch.run.record.RunRecord`.

:func:`write_report` writes ``convergence.png``, ``convergence.csv``,
``holdout.png`` and ``report.md`` (settings, baselines, the front with search and hold-out accuracy and their
difference, convergence, the plots embedded) through the run store.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .convergence import REFERENCE_POINT, Convergence
from .plots import plot_convergence, plot_holdout
from .record import RunRecord, read_record
from .store import RunStore

__all__ = ["write_report", "render_report", "deployed_rows", "DEPLOYED_HEADER"]

DEPLOYED_HEADER = ["configuration", "search (runtime)", "hold-out (runtime)", "predicted ms", "measured ms",
                   "error", "error as x FP32", "error, re-anchored", "x FP32 speed", "file MB",
                   "integer kernels after optimisation"]


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_report(run: RunRecord, conv: Convergence) -> str:
    """``report.md`` as text (figures referenced by their file names in the run directory)."""
    s = run.settings
    costs = run.cost_names
    fp32 = run.fp32_accuracy
    splits = run.summary.get("splits", {})
    bound = run.bound
    drop = bound.sign * (fp32["search"] - bound.limit)

    def show(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else bound.show(x, unit=False)

    out = [f"# quantsearch run report: `{run.run_dir.name}`", ""]

    out += ["## Settings", ""]
    settings_rows = [
        ["model", f"`{s['model']}`" + (f" (checkpoint `{s['checkpoint']}`)" if s.get("checkpoint") else "")],
        ["dataset", f"`{s['dataset']}`; splits (seed {s['seed']}): " + ", ".join(f"{k} {v}" for k, v in
                                                                                 splits.items())],
        ["quantizers", f"{len(run.quantizer_names)} (predicate `{s.get('predicate_resolved', s['predicate'])}`"
                       f", model input {'quantized' if s['quantize_input'] else 'not quantized'})"],
        ["bit range", s["bits"]] if not s.get("target") else
        ["target", f"`{s['target']}`: each Linear/Conv layer's runtime format is a gene; deployment batch "
                   f"{s.get('deploy_batch')}, threads {s.get('threads') or 'default'}"],
        ["bound", f"{bound} on the search split (FP32 {bound.show(fp32['search'])}, "
                  f"{bound.show(drop, unit=False)}{' points' if bound.fraction else ''} from it)"],
        ["cost", ", ".join(costs)],
        *([["integer operators", integer_line(run.summary["integer_ops"])]] if run.summary.get("integer_ops") else []),
        ["search", _search_line(s, run.summary)],
        ["time", f"{run.summary.get('timings_s', {}).get('total', float('nan')):.0f} s"],
    ]
    out += [_table(["setting", "value"], settings_rows), ""]

    out += ["## Baselines (search split)", ""]
    rows = [["FP32", show(fp32["search"]), show(fp32.get("holdout")),
             *[f"{run.fp32_costs[c]:g}" for c in costs], *["1.000" for _ in costs]]]
    for name, e in run.baselines.items():
        rows.append([name, show(e.accuracy), "-",
                     *[f"{e.costs[c]:g}" for c in costs], *[f"{e.costs[c] / run.fp32_costs[c]:.3f}" for c in costs]])
    out += [_table(["configuration", "search %", "hold-out %", *costs, *[f"{c} / FP32" for c in costs]], rows), ""]

    out += [f"## Pareto front ({len(run.front)} points, cheapest first)", ""]
    shift = fp32["holdout"] - fp32["search"] if "holdout" in fp32 else None
    rows, diffs = _front_rows(run, show)
    out += [_table(["#", "search %", "hold-out %", "confirmed on hold-out", "hold-out - search (points)", *costs,
                    *[f"{c} / FP32" for c in costs], "integer-only", "bit-config"], rows), ""]
    if diffs:
        mean = sum(diffs) / len(diffs)
        out.append(f"Hold-out minus search accuracy over the {len(diffs)} points: mean {100 * mean:+.2f} points, "
                   f"from {100 * min(diffs):+.2f} to {100 * max(diffs):+.2f}.")
        if shift is not None:
            kept = sum(1 for e in run.front if (run.holdout.get(e.bits) is not None
                                                and bound.sign * (run.holdout[e.bits] - fp32["holdout"]) >= -drop))
            out.append(f"FP32 itself scores {100 * shift:+.2f} points on hold-out against search (the splits "
                       f"differ in difficulty), so the search's own optimism on the points it selected is "
                       f"{100 * (mean - shift):+.2f} points on average. {kept} of {len(diffs)} points stay "
                       f"within {100 * drop:.2f} points of FP32 on the hold-out split too.")
        out.append("")
    elif not run.front:
        out += ["No configuration met the floor.", ""]
    else:
        out += ["No hold-out split: the front was not re-checked on unseen data.", ""]

    if run.summary.get("deployed"):
        out += _deployed_section(run, show)
    if run.summary.get("refined_front"):
        out += _refined_section(run, show)

    out += ["## Convergence", "",
            f"Hypervolume of the feasible front of every evaluation so far, reference point {REFERENCE_POINT}. "
            "Generation 0 holds the uniform baselines; the feasible fraction is over the configurations first "
            "evaluated in that generation.", ""]
    out += [_table(["generation", "new evaluations", "feasible %", "hypervolume"],
                   [[g, n, "-" if n == 0 else f"{100 * f / n:.0f}", f"{h:.4f}"]
                    for g, n, f, h in zip(conv.generations, conv.evaluations, conv.feasible, conv.hypervolume)]),
            ""]

    out += ["## Figures", "", f"![Pareto front: accuracy against {costs[0]}](pareto.png)", "",
            *([] if s.get("target") else ["![Bits per quantizer across the front, network order](bits_heatmap.png)",
                                          ""]),
            "![Hold-out against search accuracy of the Pareto points](holdout.png)", "",
            "![Hypervolume and feasible fraction per generation](convergence.png)", ""]
    if (run.run_dir / "sensitivity.png").is_file():
        out += ["![Per-quantizer sensitivity: accuracy drop with one quantizer lowered](sensitivity.png)", ""]
    return "\n".join(out)


def _front_rows(run: RunRecord, show) -> tuple[list[list], list[float]]:
    """The front table's rows, and each point's hold-out minus search accuracy."""
    costs = run.cost_names
    rows, diffs = [], []
    points = run.summary.get("front", [])
    integer = [{True: "yes", False: "no"}.get(p.get("integer_only"), "-") for p in points] or ["-"] * len(run.front)
    for i, e in enumerate(run.front):
        h = run.holdout.get(e.bits)
        diff = None if h is None else h - e.accuracy
        if diff is not None:
            diffs.append(diff)
        confirmed = {True: "yes", False: "**no**", None: "-"}[run.confirmed.get(e.bits)]
        rows.append([i, show(e.accuracy), show(h), confirmed, "-" if diff is None else f"{100 * diff:+.2f}",
                     *[f"{e.costs[c]:g}" for c in costs], *[f"{e.costs[c] / run.fp32_costs[c]:.3f}" for c in costs],
                     integer[i] if i < len(integer) else "-", f"[point_{i:03d}.json](pareto/point_{i:03d}.json)"])
    return rows, diffs


def deployed_rows(run: RunRecord, show) -> list[list]:
    """A target run's deployed table (:data:`DEPLOYED_HEADER`): FP32, ORT's own int8, the uniform formats and
    every front point, each as the runtime ran it (``show`` formats a metric value)."""
    deployed = run.summary["deployed"]
    rows = deployed["rows"]
    fp32, fp32_predicted = rows["FP32"]["measured_ms"], rows["FP32"]["predicted_ms"]
    out = []
    for label, row in rows.items():
        predicted, measured = row.get("predicted_ms"), row["measured_ms"]
        kernels = ", ".join(f"{v} {k}" for k, v in row["integer_kernels"].items()) or "none"
        out.append([label, show(row["search"]), show(row.get("holdout")),
                    "-" if predicted is None else f"{predicted:.3f}", f"{measured:.3f}",
                    "-" if predicted is None else f"{predicted / measured - 1:+.1%}",
                    "-" if predicted is None else f"{(predicted / fp32_predicted) / (measured / fp32) - 1:+.1%}",
                    "-" if row.get("reanchored_ms") is None else f"{row['reanchored_ms'] / measured - 1:+.1%}",
                    f"{fp32 / measured:.2f}x", f"{row['file_bytes'] / 1e6:.2f}", kernels])
    return out


def _deployed_section(run: RunRecord, show) -> list[str]:
    """What the runtime delivers, and which format each layer got on each front point."""
    deployed = run.summary["deployed"]
    out = ["## Deployed in ONNX Runtime (measured)", "",
           f"Each configuration exported as the runtime's graph, scored by a default ONNX Runtime session itself "
           f"(fed {deployed['deploy_batch']} sample(s) at a time) and timed end to end, interleaved, median of "
           f"{deployed['repeats']} rounds, threads {deployed.get('threads') or 'default'}, on "
           f"{deployed['machine'].get('cpu')}. *predicted* is what the search saw: the latency table's sum, or, for a "
           "configuration that mixes int8-static and fp32 convs (ORT converts layouts at each boundary, which the "
           "table cannot add up), its own whole-model time as a multiple of FP32's, on the table's FP32 time; "
           "*error as x FP32* compares predicted and measured latency "
           "each as a multiple of FP32's (the table is timed minutes before: this takes the machine's drift out); "
           "*re-anchored* predicts with the table's whole-model anchors (FP32 and each uniform format) replaced by "
           "this loop's own measurements, so that only the table's additivity error is left (a whole-model time: "
           "its multiple of FP32 on this loop's FP32); "
           "*uniform* rows are the "
           "search's own baselines; *ORT* rows are `onnxruntime.quantization.quantize_dynamic` / "
           "`quantize_static` of the FP32 export.", "",
           _table(DEPLOYED_HEADER, deployed_rows(run, show)), ""]
    if run.front:
        from ..deploy.targets.onnxruntime import FORMATS

        header = ["layer", *[f"#{i}" for i in range(len(run.front))]]
        rows = [[name, *[FORMATS[e.bits[j]] for e in run.front]] for j, name in enumerate(run.quantizer_names)]
        out += ["### Format of each layer on each front point", "", _table(header, rows), ""]
    return out


def _refined_section(run: RunRecord, show) -> list[str]:
    """The refined front: each refined candidate before and after, on every split, and what it cost."""
    refined, costs = run.summary["refined_front"], run.cost_names
    yes = {True: "yes", False: "**no**", None: "-"}
    rows = [[show(p["accuracy_before"]), show(p["search"]), show(p.get("validation")), yes[p["validation_passed"]],
             show(p.get("holdout")), yes[p["confirmed"]], "yes" if p["on_front"] else "",
             *[f"{p['costs'][c] / run.fp32_costs[c]:.3f}" for c in costs], f"{p['seconds']:.0f}",
             f"[{p['bitconfig'].rsplit('/', 1)[-1]}]({p['bitconfig']})"]
            for p in sorted(refined["points"], key=lambda p: p["costs"][costs[0]])]
    return [f"## Refined front ({refined['method']}, {refined['iterations']} iterations)", "",
            f"{len(refined['points'])} of {refined['candidates']} candidates refined (within the margin below the "
            f"floor, cheaper than the cheapest point that held), {refined['spent']:.0f} of "
            f"{refined['budget']:g} full evaluations spent. *before* is the search split's accuracy unrefined; "
            "refinement learns on the calibration split only.", "",
            _table(["before", "search %", "validation %", "passed", "hold-out %", "confirmed", "on the refined front",
                    *[f"{c} / FP32" for c in costs], "s", "bit-config"], rows), ""]


def integer_line(integer: dict) -> str:
    """The run's integer operators in one line, and what keeps it from being integer-only."""
    ops = integer.get("operators", {})
    kinds = sorted({f"{impl}" for impl in ops.values()})
    text = f"{len(ops)} on integers ({', '.join(kinds) or 'none'}; adds on {integer.get('add_bits')}-bit grids)"
    left = integer.get("float_operators", [])
    if integer.get("integer_only"):
        return text + "; integer-only: yes"
    why = [f"{len(left)} float ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})"] if left else []
    why += [] if integer.get("weights_quantized") else ["weights not quantized"]
    return text + f"; integer-only: no ({'; '.join(why)})"


def _search_line(s: dict, summary: dict) -> str:
    """What the search did, in one line: algorithm, budget, sensitivity, early rejection."""
    search = summary.get("search") or {}
    algorithm = search.get("algorithm", s.get("algorithm", "nsga2"))
    details = search.get("details", {})
    parts = [f"`{algorithm}`, population {s['pop_size']}, at most {s['generations']} generations, seed {s['seed']}",
             f"{summary.get('num_evaluations', 0)} evaluations"]
    if search:
        parts.append(f"{search['budget_spent']:.1f} of {search['budget']:.1f} full evaluations spent")
    if details.get("sensitivity"):
        parts.append(f"sensitivity: {details['sensitivity']} (sensitivity.csv, sensitivity.png)")
    if details.get("infilled") is not None:
        parts.append(f"{details.get('seeds', 0)} model seeds, {details['infilled']} model infill, "
                     f"{details.get('screened', 0)} offspring screened out")
    rejection = search.get("early_rejection")
    if rejection:
        parts.append(f"early rejection ({rejection.get('mode', 'floor')}): {rejection['rejected']} below the floor, "
                     f"{rejection.get('dominated', 0)} dominated, {100 * rejection['fraction_saved']:.1f} % of "
                     "images saved")
    return "; ".join(parts)


def write_report(store: RunStore) -> Path:
    """Write ``convergence.csv``, ``convergence.png``, ``holdout.png`` and ``report.md`` through the run store."""
    run = read_record(store)
    conv = run.convergence()
    store.write_csv("convergence.csv", Convergence.HEADER, conv.rows())
    plot_convergence(conv.generations, conv.hypervolume, conv.feasible_fraction,
                     path=store.run_dir / "convergence.png")
    plot_holdout(run.front, run.holdout, run.fp32_accuracy, path=store.run_dir / "holdout.png")
    return store.write_file("report.md", render_report(run, conv))
