"""The evaluation metrics on tiny hand-made labels and values, against answers worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from atlas.evaluate.metrics import feature_pearson, label_transfer, rejection_auroc


def test_label_transfer_counts_unknown_as_wrong_and_skips_unannotated_cells():
    true = ["A", "A", "A", "B", "B", "C", "undefined", ""]
    pred = ["A", "A", "B", "B", "unknown", "C", "A", "B"]
    r = label_transfer(true, pred)
    # The last two cells have no true label: 6 evaluated, 4 right (A, A, B, C).
    assert r.n_cells == 6
    assert r.accuracy == pytest.approx(4 / 6)
    assert r.unknown_fraction == pytest.approx(1 / 6)
    assert r.n_accepted == 5
    assert r.accuracy_accepted == pytest.approx(4 / 5)
    # A: TP 2, FP 0, FN 1 → F1 0.8.  B: TP 1, FP 1 (A→B), FN 1 (B→unknown) → 0.5.  C: 1.0.
    assert r.per_class_f1 == pytest.approx({"A": 0.8, "B": 0.5, "C": 1.0})
    assert r.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert r.support == {"A": 3, "B": 2, "C": 1}
    assert list(r.confusion.index) == ["A", "B", "C"]
    assert list(r.confusion.columns) == ["A", "B", "C", "unknown"]
    assert r.confusion.loc["A"].tolist() == [2, 1, 0, 0]
    assert r.confusion.loc["B"].tolist() == [0, 1, 0, 1]
    assert r.confusion.loc["C"].tolist() == [0, 0, 1, 0]


def test_label_transfer_scores_a_predicted_class_absent_from_the_truth():
    # D is never true: it is a class with F1 0 (sklearn's default), so macro-F1 averages 3 classes.
    r = label_transfer(["A", "A", "B", "B"], ["A", "D", "B", "B"])
    assert r.accuracy == pytest.approx(0.75)
    assert r.per_class_f1 == pytest.approx({"A": 2 / 3, "B": 1.0, "D": 0.0})
    assert r.macro_f1 == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert r.confusion.loc["A", "D"] == 1 and "D" not in r.confusion.index


def test_label_transfer_all_rejected_and_missing_values():
    r = label_transfer(["A", "B"], ["unknown", "unknown"])
    assert r.accuracy == 0.0 and r.unknown_fraction == 1.0 and r.macro_f1 == 0.0
    assert r.n_accepted == 0 and np.isnan(r.accuracy_accepted)
    # Missing truth is not evaluated; a missing prediction is a rejection.
    r = label_transfer(pd.Series(["A", None, np.nan, "B"]), ["A", "B", "B", None])
    assert r.n_cells == 2 and r.accuracy == 0.5 and r.unknown_fraction == 0.5
    # A custom rejection label and ignore list.
    r = label_transfer(["A", "?", "B"], ["A", "A", "n/a"], unknown="n/a", ignore=("?",))
    assert r.n_cells == 2 and r.accuracy == 0.5 and r.unknown_fraction == 0.5


def test_label_transfer_refuses_bad_input():
    with pytest.raises(ValueError, match="same cells"):
        label_transfer(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        label_transfer(["undefined", ""], ["A", "B"])
    with pytest.raises(ValueError, match="rejection label"):
        label_transfer(["unknown", "A"], ["A", "A"])


def test_rejection_auroc_by_hand():
    # Scores 1 - confidence: unseen 0.8, 0.4; seen 0.6, 0.1. Of the 4 (unseen, seen) pairs the
    # unseen cell scores higher in 3 → 0.75.
    assert rejection_auroc(np.array([True, True, False, False]), [0.2, 0.6, 0.4, 0.9]) == pytest.approx(0.75)
    # Unseen cells all less confident → 1; all more confident → 0; a tie counts half.
    assert rejection_auroc(np.array([True, False]), [0.1, 0.9]) == 1.0
    assert rejection_auroc(np.array([True, False]), [0.9, 0.1]) == 0.0
    assert rejection_auroc(np.array([True, False, False]), [0.5, 0.5, 0.9]) == pytest.approx(0.75)


def test_rejection_auroc_refuses_undefined_cases():
    with pytest.raises(ValueError, match="both"):
        rejection_auroc(np.array([True, True]), [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        rejection_auroc(np.array([True, False]), [np.nan, 0.2])
    with pytest.raises(ValueError, match="booleans"):
        rejection_auroc(np.array([1, 0]), [0.1, 0.2])
    with pytest.raises(ValueError, match="same"):
        rejection_auroc(np.array([True, False]), [0.1, 0.2, 0.3])


def test_feature_pearson_by_hand_and_aligned_by_name():
    cells = ["c1", "c2", "c3", "c4"]
    pred = pd.DataFrame({"p1": [1, 2, 3, 4], "p2": [1, 2, 3, 4], "p3": [1, 2, 3, 4]}, index=cells, dtype=float)
    # measured: other column and row order, one extra column; must be matched by name.
    measured = pd.DataFrame({"extra": [9, 9, 9, 9], "p3": [1, 3, 2, 4], "p2": [4, 3, 2, 1], "p1": [2, 4, 6, 8]},
                            index=cells, dtype=float).iloc[::-1]
    r = feature_pearson(pred, measured)
    # p3: dx = dy-permuted (-1.5, -.5, .5, 1.5) vs (-1.5, .5, -.5, 1.5): Σdxdy = 4, Σdx² = Σdy² = 5 → 0.8
    assert r.per_feature.to_dict() == pytest.approx({"p1": 1.0, "p2": -1.0, "p3": 0.8})
    assert r.mean == pytest.approx((1.0 - 1.0 + 0.8) / 3)
    assert r.median == pytest.approx(0.8)
    assert r.min == pytest.approx(-1.0)
    assert r.n_cells == 4


def test_feature_pearson_skips_nan_cells_and_constant_features():
    cells = ["a", "b", "c", "d"]
    pred = pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0], "flat": [1.0, 1.0, 1.0, 1.0]}, index=cells)
    measured = pd.DataFrame({"x": [1.0, 2.0, 100.0, 4.0], "flat": [1.0, 2.0, 3.0, 4.0]}, index=cells)
    r = feature_pearson(pred, measured)
    assert r.per_feature["x"] == pytest.approx(1.0)  # the NaN cell (c) is left out, not its 100
    assert np.isnan(r.per_feature["flat"])
    assert r.mean == pytest.approx(1.0) and r.min == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lacks feature"):
        feature_pearson(pred, measured[["x"]])
    with pytest.raises(ValueError, match="lacks 1"):
        feature_pearson(pred, measured.iloc[:3])
