"""The plain-text summary `labelstream eval` prints to the terminal."""

from __future__ import annotations

from typing import Any, TextIO

_MAX_ROWS = 25


def print_summary(output: dict[str, Any], out: TextIO) -> None:
    lines = [
        f"dataset {output['dataset']}: {output['n_images']} images ({output['n_failed']} unreadable), mode {output['mode']}",
        f"taxonomy {output['taxonomy']['name']} version {output['taxonomy']['version']}",
        _cache_line(output["embedding_cache"]),
        f"top-1 accuracy {_pct(output['top1_accuracy'])} (95% CI {_ci(output['top1_ci'])})",
        f"top-5 accuracy {_pct(output['top5_accuracy'])} (95% CI {_ci(output['top5_ci'])})",
        f"macro P/R/F1 {_prf(output['macro'])}   micro P/R/F1 {_prf(output['micro'])}",
    ]
    lines += [f"warning: {w}" for w in output["warnings"]]
    lines += _confused_lines(output["most_confused"])
    lines += _threshold_lines(output["thresholds"], output["target"])
    lines += _compare_lines(output["compare"])
    if output.get("written_taxonomy"):
        written = output["written_taxonomy"]
        lines.append(f"wrote taxonomy with thresholds to {written['path']} (version {written['version']})")
    out.write("\n".join(lines) + "\n")
    out.flush()


def _cache_line(cache: dict[str, Any]) -> str:
    if cache["hit"]:
        return f"image embeddings: loaded from cache in {cache['seconds']:.2f}s (no image encoded)"
    return f"image embeddings: encoded {cache['images_encoded']} images in {cache['seconds']:.2f}s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ci(ci: list[float]) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def _prf(values: dict[str, float]) -> str:
    return f"{values['precision']:.3f}/{values['recall']:.3f}/{values['f1']:.3f}"


def _confused_lines(pairs: list[dict[str, Any]]) -> list[str]:
    if not pairs:
        return []
    return ["most confused (true -> predicted: images):"] + [
        f"  {p['true']} -> {p['predicted']}: {p['count']}" for p in pairs
    ]


def _threshold_lines(thresholds: dict[str, Any] | None, target: dict[str, Any] | None) -> list[str]:
    if not thresholds:
        return []
    heading = f"thresholds for target {target['metric']} {target['value']}" if target else "the taxonomy's thresholds"
    lines = [f"{heading} (auto: score >= threshold; review: review threshold <= score < threshold):",
             f"  {'class':<24} {'thresh':>7} {'prec':>6} {'recall':>6} {'review':>7} {'auto%':>6} {'review%':>7}"]
    for name, t in list(thresholds.items())[:_MAX_ROWS]:
        flag = "" if t["reachable"] else "  TARGET UNREACHABLE"
        lines.append(
            f"  {name[:24]:<24} {t['threshold']:>7.3f} {t['precision']:>6.3f} {t['recall']:>6.3f} "
            f"{t['review_threshold']:>7.3f} {t['auto_share']:>6.1%} {t['review_share']:>7.1%}{flag}"
        )
    if len(thresholds) > _MAX_ROWS:
        lines.append(f"  ... {len(thresholds) - _MAX_ROWS} more classes in --json")
    return lines


def _compare_lines(compare: dict[str, Any] | None) -> list[str]:
    if not compare:
        return []
    low, high = compare["difference_ci"]
    return [
        f"compare {compare['candidate']} against {compare['baseline']}: top-1 {_pct(compare['candidate_accuracy'])} "
        f"vs {_pct(compare['baseline_accuracy'])}, difference {compare['accuracy_difference']:+.1%} "
        f"(95% CI {low:+.1%} to {high:+.1%}), {compare['test']} p={compare['p_value']:.4g}"
    ]
