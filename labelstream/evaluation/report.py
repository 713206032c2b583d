"""The self-contained HTML audit report of `labelstream eval --report`.

One file, no network: CSS inline, no scripts or web fonts, plots and
thumbnails as data URIs. With many classes, tables, PR curves and galleries
show the worst classes only (lowest F1 or AP) and say so, so a 1,000-class
report stays readable and small.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labelstream.evaluation import metrics, plots
from labelstream.evaluation.results import Evaluation
from pipeline.config import ImageSettings
from pipeline.decode import decode_image
from pipeline.errors import LabelstreamError

MAX_MATRIX_CLASSES = 30
MAX_CURVES = 12
MAX_TABLE_ROWS = 50
MAX_GALLERY_CLASSES = 10
PER_GALLERY = 4
THUMBNAIL_SIDE = 128

ThumbnailSource = Callable[[str], bytes]

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:6px 10px}
.warn{color:#9a3b00}.gallery{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:8px}
figure{margin:0;width:150px;font-size:11px}figure img{width:128px;height:128px;object-fit:cover;border:1px solid #ccc}
figcaption{word-break:break-word}h3{margin-top:1.5em}.empty{color:#777;font-style:italic}
"""


@dataclass(frozen=True)
class GalleryItem:
    location: str
    caption: str


def thumbnail_uri(data: bytes) -> str | None:
    """A small JPEG data URI, decoded with the worker's hardened decoder; None if it cannot be read."""
    try:
        image = decode_image(data, ImageSettings())
    except LabelstreamError:
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def page(title: str, sections: Iterable[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>\n"
    )


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def table(headers: list[str], rows: Iterable[list[object]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def gallery(items: list[GalleryItem], thumbnails: ThumbnailSource) -> str:
    if not items:
        return '<p class="empty">none</p>'
    figures = []
    for item in items:
        uri = _safe_thumbnail(item.location, thumbnails)
        image = f'<img src="{uri}" alt="{esc(item.location)}">' if uri else '<p class="empty">(no image)</p>'
        figures.append(f"<figure>{image}<figcaption>{esc(item.caption)}</figcaption></figure>")
    return f'<div class="gallery">{"".join(figures)}</div>'


def _safe_thumbnail(location: str, thumbnails: ThumbnailSource) -> str | None:
    try:
        return thumbnail_uri(thumbnails(location))
    except LabelstreamError:
        return None


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)


def write_report(evaluation: Evaluation, thumbnails: ThumbnailSource, out: Path, context: dict[str, object]) -> None:
    sections = [
        _summary_section(evaluation.summary, context),
        _class_table_section(evaluation),
        _confusion_section(evaluation),
        _thresholds_section(evaluation),
        _curves_section(evaluation),
        _galleries_section(evaluation, thumbnails),
    ]
    out.write_text(page(f"labelstream evaluation: {evaluation.taxonomy.name}", sections), encoding="utf-8")


def _summary_section(summary: dict[str, object], context: dict[str, object]) -> str:
    rows = [
        ["dataset", context.get("dataset")],
        ["taxonomy", f"{evaluation_name(summary)}"],
        ["mode", summary["mode"]],
        ["images", summary["n_images"]],
        ["images that could not be read", context.get("n_failed", 0)],
        ["top-1 accuracy", _with_ci(summary["top1_accuracy"], summary["top1_ci"])],
        ["top-5 accuracy", _with_ci(summary["top5_accuracy"], summary["top5_ci"])],
        ["macro F1", fmt(summary["macro"]["f1"])],  # type: ignore[index]
        ["micro F1", fmt(summary["micro"]["f1"])],  # type: ignore[index]
        ["mean average precision", fmt(summary["mean_average_precision"])],
    ]
    html_rows = "".join(
        f'<tr><td>{esc(k)}</td><td data-key="{esc(k)}">{esc(fmt(v))}</td></tr>' for k, v in rows
    )
    warnings = "".join(f'<li class="warn">{esc(w)}</li>' for w in context.get("warnings", []))  # type: ignore[attr-defined]
    compare = _compare_block(context.get("compare"))
    return f"<h2>Summary</h2><table>{html_rows}</table>{f'<ul>{warnings}</ul>' if warnings else ''}{compare}"


def evaluation_name(summary: dict[str, object]) -> str:
    taxonomy = summary["taxonomy"]
    return f"{taxonomy['name']} (version {taxonomy['version']})"  # type: ignore[index]


def _with_ci(value: object, ci: object) -> str:
    low, high = ci  # type: ignore[misc]
    return f"{fmt(value)} (95% CI {fmt(low)} to {fmt(high)})"


def _compare_block(compare: object) -> str:
    if not isinstance(compare, dict):
        return ""
    rows = [[k, fmt(v if not isinstance(v, list) else f"{v[0]:.3f} to {v[1]:.3f}")] for k, v in compare.items()]
    return "<h3>Comparison</h3>" + table(["", "value"], rows)


def _worst(names: list[str], keys: list[float], limit: int) -> list[int]:
    """Indices of the `limit` classes with the lowest key (NaN counts as worst)."""
    def key(i: int) -> float:
        return float("-inf") if keys[i] is None or np.isnan(keys[i]) else keys[i]

    return sorted(range(len(names)), key=key)[:limit]


def _limit_note(shown: int, total: int, what: str, by: str) -> str:
    if shown >= total:
        return ""
    return note(f"{total} classes: showing the {shown} with the lowest {by} in {what}; the JSON output has all of them.")


def _class_table_section(evaluation: Evaluation) -> str:
    per_class = evaluation.summary["per_class"]
    ap = evaluation.summary["average_precision"]
    names = evaluation.labels
    f1 = [per_class[n]["f1"] for n in names]  # type: ignore[index]
    shown = _worst(names, f1, MAX_TABLE_ROWS) if len(names) > MAX_TABLE_ROWS else list(range(len(names)))
    rows = [
        [names[i], fmt(per_class[names[i]]["precision"]), fmt(per_class[names[i]]["recall"]),  # type: ignore[index]
         fmt(per_class[names[i]]["f1"]), per_class[names[i]]["support"], fmt(ap[names[i]])]  # type: ignore[index]
        for i in shown
    ]
    return (
        "<h2>Per-class metrics</h2>" + _limit_note(len(shown), len(names), "this table", "F1")
        + table(["class", "precision", "recall", "F1", "support", "average precision"], rows)
        + _most_confused(evaluation.summary.get("most_confused") or [])  # type: ignore[arg-type]
    )


def _most_confused(pairs: list[dict[str, object]]) -> str:
    if not pairs:
        return ""
    return "<h3>Most confused pairs</h3>" + table(["true", "predicted as", "images"], [[p["true"], p["predicted"], p["count"]] for p in pairs])


def _confusion_section(evaluation: Evaluation) -> str:
    confusion = evaluation.summary.get("confusion")
    if not confusion:
        return "<h2>Confusion matrix</h2>" + note("Multi-label data has no confusion matrix; see the per-class AP.")
    matrix = np.array(confusion["matrix"])  # type: ignore[index]
    names = evaluation.labels
    recall = [evaluation.summary["per_class"][n]["recall"] for n in names]  # type: ignore[index]
    shown = sorted(_worst(names, recall, MAX_MATRIX_CLASSES)) if len(names) > MAX_MATRIX_CLASSES else list(range(len(names)))
    uri = plots.confusion_heatmap(matrix[np.ix_(shown, shown)], [names[i] for i in shown])
    return (
        "<h2>Confusion matrix</h2>" + _limit_note(len(shown), len(names), "the matrix", "recall")
        + f'<img class="plot" src="{uri}" alt="confusion matrix heatmap">'
    )


def _thresholds_section(evaluation: Evaluation) -> str:
    if evaluation.thresholds is None:
        return ""
    target = evaluation.target
    heading = f"target {target.metric} {target.value}" if target else "the taxonomy's own thresholds"
    names = list(evaluation.thresholds)
    precision = [evaluation.thresholds[n].precision for n in names]
    shown = _worst(names, precision, MAX_TABLE_ROWS) if len(names) > MAX_TABLE_ROWS else list(range(len(names)))
    rows = []
    for i in shown:
        t = evaluation.thresholds[names[i]]
        reached = "yes" if t.reachable else "NO: target unreachable"
        rows.append([names[i], fmt(t.threshold), fmt(t.precision), fmt(t.recall), reached,
                     fmt(t.review_threshold), f"{t.auto_share:.1%}", f"{t.review_share:.1%}"])
    headers = ["class", "threshold (auto)", "precision", "recall", "target reached", "review threshold", "auto share", "review share"]
    return (
        f"<h2>Thresholds ({esc(heading)})</h2>" + _limit_note(len(shown), len(names), "this table", "precision")
        + table(headers, rows)
    )


def _curves_section(evaluation: Evaluation) -> str:
    names = evaluation.labels
    ap = [evaluation.summary["average_precision"][n] for n in names]  # type: ignore[index]
    ap_keys = [float("nan") if v is None else v for v in ap]
    shown = _worst(names, ap_keys, MAX_CURVES)
    curves = {names[i]: metrics.pr_curve(evaluation.truth[:, i], evaluation.scores[:, i]) for i in shown}
    marks = {}
    if evaluation.thresholds is not None:
        marks = {n: [("auto", evaluation.thresholds[n].threshold), ("review", evaluation.thresholds[n].review_threshold)]
                 for n in curves}
    uri = plots.pr_curves(curves, marks)
    return (
        "<h2>Precision-recall curves</h2>" + _limit_note(len(shown), len(names), "these curves", "average precision")
        + f'<img class="plot" src="{uri}" alt="precision-recall curves">'
    )


def _galleries_section(evaluation: Evaluation, thumbnails: ThumbnailSource) -> str:
    names = evaluation.labels
    f1 = [evaluation.summary["per_class"][n]["f1"] for n in names]  # type: ignore[index]
    shown = _worst(names, f1, MAX_GALLERY_CLASSES)
    parts = ["<h2>Galleries</h2>", _limit_note(len(shown), len(names), "the galleries", "F1")]
    for i in shown:
        parts.append(f"<h3>{esc(names[i])}</h3>")
        for title, rows in _gallery_rows(evaluation, i).items():
            parts.append(f"<h4>{esc(title)}</h4>")
            parts.append(gallery([GalleryItem(evaluation.locations[r], _caption(evaluation, r)) for r in rows], thumbnails))
    return "".join(parts)


def _gallery_rows(evaluation: Evaluation, index: int) -> dict[str, list[int]]:
    scores, truth = evaluation.scores[:, index], evaluation.truth[:, index]
    predicted = evaluation.predicted == index
    correct = np.nonzero(truth & predicted)[0]
    mistakes = np.nonzero(predicted & ~truth)[0]
    involved = np.nonzero(truth | predicted)[0]
    distance = np.abs(scores - _boundary(evaluation, index))
    return {
        "Most confident correct": _by_score(correct, scores, descending=True),
        "Most confident mistakes (predicted as this class, but it is not)": _by_score(mistakes, scores, descending=True),
        "Borderline (nearest the threshold)": _by_score(involved, distance, descending=False),
    }


def _boundary(evaluation: Evaluation, index: int) -> np.ndarray | float:
    """The class's threshold when there is one, else the best competing score (the top-1 decision boundary)."""
    if evaluation.thresholds is not None:
        return evaluation.thresholds[evaluation.labels[index]].threshold
    others = np.delete(evaluation.scores, index, axis=1)
    return others.max(axis=1) if others.size else 0.0


def _by_score(rows: np.ndarray, keys: np.ndarray, descending: bool) -> list[int]:
    order = np.argsort(-keys[rows] if descending else keys[rows], kind="stable")
    return [int(r) for r in rows[order][:PER_GALLERY]]


def _caption(evaluation: Evaluation, row: int) -> str:
    names = evaluation.labels
    true = ", ".join(names[i] for i in np.nonzero(evaluation.truth[row])[0])
    top = np.argsort(-evaluation.scores[row], kind="stable")[:3]
    predicted = ", ".join(f"{names[i]} {evaluation.scores[row, i]:.3f}" for i in top)
    return f"{Path(evaluation.locations[row]).name} | true: {true} | predicted: {predicted}"
