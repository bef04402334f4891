"""The results as a picture: the main metric against inference speed, one point per model row.

What a distillation run bought, at a glance: how much quality (y) for how much speed (x, examples/s on a log
scale) and size (marker area, proportional to the parameter count). :func:`plot_results` draws one run's
``results.json``; :func:`draw` draws any points, with range bars where a point is the median of several runs
(``benchmarks/bench_offline.py --summarize``). Matplotlib's ``Figure`` is used without ``pyplot``, so no
display or backend is needed (the PNG is written by the Agg canvas).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

# Colour per model kind (student kind, or the teacher); marker per training mode.
COLOURS = {"teacher": "#444444", "ensemble": "#7f3b08", "layers": "#1f77b4", "compact": "#ff7f0e"}
OTHER_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
MARKERS = {"hard labels": "o", "KD": "o", "KD + transfer set": "D", "KD from the ensemble": "s"}
LARGEST_MARKER = 700.0  # points², the area of the largest model's marker
SMALLEST_MARKER = 40.0


@dataclass(frozen=True)
class Point:
    """One model row: its label, speed (examples/s), main metric (×100) and size; ranges over several runs."""

    label: str
    kind: str  # "teacher", "ensemble" or the student kind: the colour
    training: str  # the marker; "hard labels" is drawn hollow
    examples_per_second: float
    score: float
    parameters: int
    speed_range: tuple[float, float] | None = None
    score_range: tuple[float, float] | None = None


def kind_of(row: dict[str, Any]) -> str:
    if row["student"] is not None:
        return row["student"]
    return "ensemble" if row["name"].startswith("ensemble") else "teacher"


def label_of(row: dict[str, Any]) -> str:
    """``"<model>, <training> (<parameters>M)"``: a teacher without its checkpoint's name (with its seed)."""
    name, _, detail = row["name"].partition(" (")
    seed = detail.rstrip(")").rpartition(", ")[2] if ", seed " in detail else ""
    name += f" ({seed})" if seed.startswith("seed ") and row["student"] is None else ""
    return f"{name}, {row['training']} ({row['parameters'] / 1e6:.1f}M)"


def points_of(summary: dict[str, Any]) -> list[Point]:
    """One point per row of a run's summary (``results.json``): the main metric on the report split."""
    split, metric = summary["report_split"], summary["main_metric"]
    return [
        Point(
            label=label_of(row),
            kind=kind_of(row),
            training=row["training"],
            examples_per_second=row["examples_per_second"],
            score=100 * row["metrics"][split].get(metric, float("nan")),
            parameters=row["parameters"],
        )
        for row in summary["results"]
    ]


def plot_results(summary: dict[str, Any], path: str | os.PathLike) -> list[Point]:
    """Draw a run's summary into ``path`` (a PNG); returns the points drawn."""
    split, metric = summary["report_split"], summary["main_metric"]
    task = summary["task"]
    data = task["dataset"] + (f" ({task['dataset_config']})" if task.get("dataset_config") else "")
    return draw(
        points_of(summary),
        path,
        ylabel=f"{metric} on {split} (×100)",
        title=f"{data}: quality against inference speed",
        note=f"{summary.get('device', '')}, {summary.get('torch_threads', '?')} threads".lstrip(", "),
    )


def _colour(kind: str, seen: dict[str, str]) -> str:
    if kind in COLOURS:
        return COLOURS[kind]
    return seen.setdefault(kind, OTHER_COLOURS[len(seen) % len(OTHER_COLOURS)])


def draw(
    points: list[Point],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str,
    note: str = "",
) -> list[Point]:
    """Draw ``points`` (score against speed, log x; marker area proportional to parameters; range bars where
    given) with a label beside each point, and save the PNG at ``path``. Returns ``points``."""
    figure = Figure(figsize=(9, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    largest = max(p.parameters for p in points)
    others: dict[str, str] = {}
    sizes = [max(SMALLEST_MARKER, LARGEST_MARKER * p.parameters / largest) for p in points]
    for p, size in zip(points, sizes, strict=True):
        colour = _colour(p.kind, others)
        hollow = p.training == "hard labels"
        if p.score_range or p.speed_range:
            ax.errorbar(
                p.examples_per_second,
                p.score,
                yerr=_bar(p.score, p.score_range),
                xerr=_bar(p.examples_per_second, p.speed_range),
                fmt="none",
                ecolor=colour,
                elinewidth=1,
                capsize=3,
                alpha=0.8,
                zorder=2,
            )
        ax.scatter(
            p.examples_per_second,
            p.score,
            s=size,
            marker="*" if p.kind in ("teacher", "ensemble") else MARKERS.get(p.training, "o"),
            facecolors="white" if hollow else colour,
            edgecolors=colour,
            linewidths=1.5,
            alpha=0.9,
            zorder=3,
        )
    # A metric can be NaN (a correlation of constant predictions): such a point is not drawn and sets no limit.
    speeds = [p.examples_per_second for p in points if math.isfinite(p.examples_per_second)] or [1.0]
    scores = [s for p in points for s in (p.score, *(p.score_range or ())) if math.isfinite(s)] or [0.0]
    ax.set_xscale("log")
    ax.set_xlim(min(speeds) / 1.6, max(speeds) * 4)  # room on the right for the labels
    pad = max(1.0, 0.12 * (max(scores) - min(scores)))
    ax.set_ylim(min(scores) - pad, max(scores) + pad)
    ax.set_xlabel("inference speed (examples/s, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    caption = "marker area ∝ parameters; hollow: hard labels only (no teacher)"
    if any(p.score_range or p.speed_range for p in points):
        caption += "; bars: min-max over runs, point: median"
    ax.text(
        0.01, 0.01, caption + (f"; {note}" if note else ""), transform=ax.transAxes, fontsize=8, alpha=0.7
    )
    _label(ax, figure, points, largest)
    figure.savefig(path)
    return points


def _bar(centre: float, bounds: tuple[float, float] | None) -> list[list[float]] | None:
    if bounds is None:
        return None
    return [[centre - bounds[0]], [bounds[1] - centre]]


def _label(ax, figure: Figure, points: list[Point], largest: int) -> None:
    """A label beside each point: right of it where the label clears every marker and every label placed
    before, else a little higher or lower, left of it, above or below it (the first place that clears and
    stays inside the axes; right of the point when none does)."""
    figure.canvas.draw()  # fixes the limits and the transforms
    renderer = figure.canvas.get_renderer()
    scale = figure.dpi / 72  # pixels per point
    points = [p for p in points if math.isfinite(p.score) and math.isfinite(p.examples_per_second)]
    sizes = [max(SMALLEST_MARKER, LARGEST_MARKER * p.parameters / largest) for p in points]
    centres = [ax.transData.transform((p.examples_per_second, p.score)) for p in points]
    radii = [scale * size**0.5 / 2 for size in sizes]
    markers = [
        Bbox.from_extents(x - r, y - r, x + r, y + r) for (x, y), r in zip(centres, radii, strict=True)
    ]
    bars = []  # every range bar, a label's own included
    for p in points:
        if p.speed_range:
            (x0, y), (x1, _) = ax.transData.transform([(v, p.score) for v in p.speed_range])
            bars.append(Bbox.from_extents(x0, y - 3, x1, y + 3))
        if p.score_range:
            (x, y0), (_, y1) = ax.transData.transform([(p.examples_per_second, v) for v in p.score_range])
            bars.append(Bbox.from_extents(x - 3, y0, x + 3, y1))
    inside = ax.get_window_extent(renderer)
    taken: list[Bbox] = []
    for i in sorted(range(len(points)), key=lambda i: centres[i][0]):  # from the left: the right is freer
        p = points[i]
        gap = radii[i] / scale + 4  # points from the centre to the label
        shifts = (0, 11, -11, 22, -22, 33, -33)
        candidates = [((gap, dy), "left", "center") for dy in shifts]
        candidates += [((-gap, dy), "right", "center") for dy in shifts]
        candidates += [((0, gap), ha, "bottom") for ha in ("left", "right")]
        candidates += [((0, -gap), ha, "top") for ha in ("left", "right")]
        for n, (offset, ha, va) in enumerate(candidates):
            text = ax.annotate(
                p.label,
                (p.examples_per_second, p.score),
                xytext=offset,
                textcoords="offset points",
                fontsize=8.5,
                ha=ha,
                va=va,
                arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5} if offset[0] and offset[1] else None,
            )
            box = text.get_window_extent(renderer)
            clear = not any(box.overlaps(m) for j, m in enumerate(markers) if j != i)
            clear = clear and not any(box.overlaps(t) for t in [*taken, *bars])
            clear = clear and inside.containsx(box.x0) and inside.containsx(box.x1)
            clear = clear and inside.containsy(box.y0) and inside.containsy(box.y1)
            if clear or n == len(candidates) - 1:
                if not clear:  # nowhere clear: the first place, right of the point
                    text.remove()
                    text = ax.annotate(
                        p.label,
                        (p.examples_per_second, p.score),
                        xytext=candidates[0][0],
                        textcoords="offset points",
                        fontsize=8.5,
                        ha="left",
                        va="center",
                    )
                    box = text.get_window_extent(renderer)
                taken.append(box)
                break
            text.remove()
