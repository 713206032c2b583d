"""Evaluation metrics, calibration, the paired test and dataset parsing, against hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from labelstream.evaluation import metrics
from labelstream.evaluation.calibration import Target, calibrate, choose_threshold, measure_at
from labelstream.evaluation.compare import compare_hits, mcnemar
from labelstream.evaluation.dataset import (
    class_mapping,
    classes_without_images,
    imagenet_synsets,
    load_dataset,
    truth_matrix,
)
from pipeline.errors import ConfigError
from pipeline.taxonomy import imagenet_taxonomy, parse_taxonomy

# Four images, three classes. True classes 0, 0, 1, 2; top-1 predictions 0, 1, 1, 0.
SCORES = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]])
TRUE_INDEX = np.array([0, 0, 1, 2])
TRUTH = np.eye(3, dtype=bool)[TRUE_INDEX]
LABELS = ["cat", "dog", "bird"]

# One class, five images ranked by score: positive, negative, positive, positive, negative.
RANKED_POSITIVE = np.array([True, False, True, True, False])
RANKED_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5])


def test_top1_and_top2_accuracy() -> None:
    assert metrics.topk_hits(SCORES, TRUTH, 1).tolist() == [True, False, True, False]
    assert metrics.topk_hits(SCORES, TRUTH, 2).mean() == 1.0
    assert metrics.topk_hits(SCORES, TRUTH, 5).mean() == 1.0  # k above the class count is every class


def test_confusion_matrix_rows_are_true_classes() -> None:
    matrix = metrics.confusion_matrix(TRUE_INDEX, SCORES.argmax(axis=1), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_per_class_precision_recall_f1_and_averages() -> None:
    matrix = metrics.confusion_matrix(TRUE_INDEX, SCORES.argmax(axis=1), 3)
    cat, dog, bird = metrics.per_class_reports(matrix)
    assert (cat.precision, cat.recall, cat.f1, cat.support) == (0.5, 0.5, 0.5, 2)
    assert (dog.precision, dog.recall, dog.support) == (0.5, 1.0, 1)
    assert dog.f1 == pytest.approx(2 / 3)
    assert (bird.precision, bird.recall, bird.f1, bird.support) == (0.0, 0.0, 0.0, 1)
    macro = metrics.macro_average([cat, dog, bird])
    assert macro["precision"] == pytest.approx(1 / 3)
    assert macro["recall"] == pytest.approx(0.5)
    assert metrics.micro_average(matrix) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_most_confused_pairs_largest_first() -> None:
    matrix = np.array([[5, 3, 0], [1, 4, 7], [0, 0, 2]])
    assert metrics.most_confused(matrix, LABELS, limit=2) == [
        {"true": "dog", "predicted": "bird", "count": 7},
        {"true": "cat", "predicted": "dog", "count": 3},
    ]
    assert len(metrics.most_confused(matrix, LABELS)) == 3  # zero cells are never "confused"


def test_average_precision_by_hand() -> None:
    # Positives at ranks 1, 3, 4: AP = (1/1 + 2/3 + 3/4) / 3.
    assert metrics.average_precision(RANKED_POSITIVE, RANKED_SCORES) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert math.isnan(metrics.average_precision(np.zeros(3, bool), np.array([0.1, 0.2, 0.3])))


def test_average_precision_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    truth = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + truth * 0.3, 1)  # rounding makes many ties
    assert metrics.average_precision(truth, scores) == pytest.approx(average_precision_score(truth, scores))


def test_pr_curve_points() -> None:
    curve = metrics.pr_curve(RANKED_POSITIVE, RANKED_SCORES)
    assert curve.thresholds.tolist() == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert curve.precision.tolist() == pytest.approx([3 / 5, 3 / 4, 2 / 3, 1 / 2, 1.0])
    assert curve.recall.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 1 / 3])


def test_bootstrap_interval_brackets_the_mean() -> None:
    assert metrics.bootstrap_ci(np.ones(50)) == (1.0, 1.0)
    values = np.r_[np.ones(70), np.zeros(30)]
    low, high = metrics.bootstrap_ci(values)
    assert low < 0.7 < high and high - low < 0.25


def test_threshold_for_a_target_precision_is_the_lowest_reaching_it() -> None:
    # Precision at 0.5..0.9 is 0.6, 0.75, 0.667, 0.5, 1.0: the lowest reaching 0.7 is 0.6,
    # even though the higher 0.7 and 0.8 do not reach it.
    assert choose_threshold(RANKED_POSITIVE, RANKED_SCORES, Target("precision", 0.7)) == 0.6
    assert choose_threshold(RANKED_POSITIVE, RANKED_SCORES, Target("precision", 0.8)) == 0.9
    measured = measure_at(RANKED_POSITIVE, RANKED_SCORES, 0.6, review_recall=1.0)
    assert (measured.precision, measured.recall) == (0.75, 1.0)
    assert measured.auto_share == 0.8  # four of five images score at least 0.6


def test_threshold_for_a_target_recall_is_the_highest_keeping_it() -> None:
    assert choose_threshold(RANKED_POSITIVE, RANKED_SCORES, Target("recall", 0.6)) == 0.7
    assert choose_threshold(RANKED_POSITIVE, RANKED_SCORES, Target("recall", 1.0)) == 0.6


def test_unreachable_target_is_flagged_and_keeps_the_current_threshold() -> None:
    taxonomy = parse_taxonomy(
        "name: t\nmode: multi_label\nthreshold: 0.4\ntemplates: ['{}']\nclasses: [a, b]\n"
    )
    truth = np.array([[False, True], [True, False]])
    scores = np.array([[0.9, 0.8], [0.1, 0.2]])  # class a: the only positive scores lowest
    result = calibrate(truth, scores, taxonomy, Target("precision", 0.9), review_recall=0.9)
    assert result["a"].reachable is False and result["a"].threshold == 0.4
    assert result["b"].reachable is True and result["b"].threshold == pytest.approx(0.8)
    assert result["b"].precision == 1.0


def test_review_band_lies_below_the_auto_threshold() -> None:
    measured = measure_at(RANKED_POSITIVE, RANKED_SCORES, 0.9, review_recall=1.0)
    # Recall 1.0 needs threshold 0.6: images scoring 0.6, 0.7, 0.8 go to review, 0.9 is automatic.
    assert measured.review_threshold == 0.6
    assert (measured.auto_share, measured.review_share) == (0.2, pytest.approx(0.6))


def test_mcnemar_exact_and_chi_squared() -> None:
    # Exact: 6 discordant pairs, split 1/5: p = 2 * (C(6,0) + C(6,1)) / 2^6.
    assert mcnemar(1, 5) == ("mcnemar_exact", pytest.approx(14 / 64))
    test, p_value = mcnemar(10, 30)
    assert test == "mcnemar_chi2"
    assert p_value == pytest.approx(math.erfc(math.sqrt((abs(10 - 30) - 1) ** 2 / 40 / 2)))
    assert mcnemar(0, 0) == ("mcnemar_exact", 1.0)


def test_compare_hits_reports_the_paired_difference() -> None:
    a = np.array([True] * 50 + [False] * 50)
    b = np.array([True] * 50 + [True] * 20 + [False] * 30)
    result = compare_hits("a.yaml", "b.yaml", a, b)
    assert result.accuracy_difference == pytest.approx(0.2)
    assert (result.only_baseline_right, result.only_candidate_right) == (0, 20)
    assert result.p_value < 0.001
    assert result.difference_ci[0] > 0.05


def test_manifests_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,labels\na.jpg,cat;dog\ns3://bucket/b.jpg,bird\n")
    csv_dataset = load_dataset(str(tmp_path / "m.csv"))
    assert [s.labels for s in csv_dataset.samples] == [("cat", "dog"), ("bird",)]
    assert csv_dataset.samples[0].location == str(tmp_path / "a.jpg")
    assert csv_dataset.samples[1].location == "s3://bucket/b.jpg"
    assert csv_dataset.is_multi_label
    lines = [{"image": "a.jpg", "label": "cat"}, {"path": "a.jpg", "labels": ["dog"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    jsonl_dataset = load_dataset(str(tmp_path / "m.jsonl"))
    assert [s.labels for s in jsonl_dataset.samples] == [("cat",), ("dog",)]
    assert not jsonl_dataset.is_multi_label


def test_class_mapping_errors_name_the_missing_class() -> None:
    with pytest.raises(ConfigError, match="'zebra'"):
        class_mapping(["cat", "zebra"], LABELS, {})
    mapping = class_mapping(["cat", "kitty"], LABELS, {"kitty": "cat"})
    assert mapping == {"cat": "cat", "kitty": "cat"}
    assert classes_without_images(mapping, LABELS) == ["dog", "bird"]


def test_imagenet_synset_folders_map_to_the_builtin_class_names() -> None:
    synsets = imagenet_synsets()
    names = imagenet_taxonomy().class_names
    assert list(synsets) [:2] == ["n01440764", "n01443537"]
    assert list(synsets.values()) == names  # same 1,000 classes, same order
    assert class_mapping(["n01440764", "n15075141"], names, {}) == {"n01440764": "tench", "n15075141": "toilet paper"}


def test_truth_matrix_multi_label(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"image": "x.jpg", "labels": ["cat", "bird"]}\n')
    dataset = load_dataset(str(tmp_path / "m.jsonl"))
    truth = truth_matrix(dataset, {"cat": "cat", "bird": "bird"}, LABELS)
    assert truth.tolist() == [[True, False, True]]


def test_report_with_1000_classes_shows_the_worst_and_says_so(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from labelstream.evaluation.report import write_report
    from labelstream.evaluation.results import evaluate

    classes, images = 1000, 2000
    taxonomy = parse_taxonomy("name: big\ntemplates: ['{}']\nclasses: [" + ", ".join(f"c{i}" for i in range(classes)) + "]\n")
    rng = np.random.default_rng(0)
    true_index = rng.integers(0, classes, images)
    scores = rng.random((images, classes)).astype(np.float32)
    scores[np.arange(images), true_index] += 0.5
    scores /= scores.sum(axis=1, keepdims=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
    evaluation = evaluate(taxonomy, "v1", [f"/data/{i}.jpg" for i in range(images)], np.eye(classes, dtype=bool)[true_index],
                          scores, multi_label_data=False, target=None, review_recall=0.9)
    assert len(evaluation.summary["per_class"]) == classes
    write_report(evaluation, lambda location: buffer.getvalue(), tmp_path / "big.html", {"dataset": "synthetic"})
    html = (tmp_path / "big.html").read_text()
    assert html.count("1000 classes: showing the") == 4  # table, matrix, curves, galleries
    assert (tmp_path / "big.html").stat().st_size < 2_000_000
