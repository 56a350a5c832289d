"""Mapping-quality metrics with the field's definitions (scikit-learn), numpy only, no Ray.

Label transfer (:func:`label_transfer`)
    Cells whose *true* label is missing or in ``ignore`` (``""``, ``"undefined"``: not annotated)
    are left out: nothing can be said about them. A cell *predicted* ``unknown`` (rejected by a
    confidence threshold) is a wrong answer: it counts against ``accuracy`` and is a false
    negative for its true class in the F1 scores. ``unknown`` is a refusal, not a class: it gets
    no F1 of its own and is not averaged into macro-F1. Every other predicted label is a class,
    as in scikit-learn's default (``labels`` = true ∪ predicted): a prediction of a class absent
    from the truth gets F1 = 0 and lowers macro-F1. Because rejection mixes two questions
    ("how often does it answer" and "how often is an answer right"), the result also reports the
    fraction rejected and the accuracy on the cells it did answer.

Unseen-type rejection (:func:`rejection_auroc`)
    AUROC (``sklearn.metrics.roc_auc_score``) of ``1 − confidence`` as a score for "this cell
    is of a type the reference lacks": 1.0 = every unseen cell is less confident than every seen
    one, 0.5 = confidence says nothing about it. Threshold-free, so it judges the confidence
    itself, not one threshold.

Missing-modality prediction (:func:`feature_pearson`)
    Per feature, Pearson r across cells between predicted and measured values (the paper's
    "Pearson r per protein on held-out cells"), then its mean, median and minimum over features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from atlas.names import UNKNOWN  # the label of a rejected cell; re-exported by atlas.evaluate


@dataclass(frozen=True)
class LabelTransfer:
    """How well predicted labels match the true ones on the annotated cells."""

    n_cells: int
    """Cells evaluated (true label present and not ignored)."""
    accuracy: float
    """Fraction of evaluated cells whose prediction equals the truth (``unknown`` = wrong)."""
    macro_f1: float
    """Unweighted mean of ``per_class_f1`` (every class counts the same, however rare)."""
    per_class_f1: dict[str, float]
    """F1 of each class in the truth or the predictions (``unknown`` excluded), sorted by name."""
    support: dict[str, int]
    """Evaluated cells of each true class."""
    confusion: pd.DataFrame
    """Cell counts: rows = true classes, columns = predicted classes, then ``unknown``."""
    unknown_fraction: float
    """Fraction of evaluated cells predicted ``unknown``."""
    accuracy_accepted: float
    """Accuracy on the evaluated cells not predicted ``unknown`` (NaN when all were rejected)."""
    n_accepted: int
    """Evaluated cells not predicted ``unknown``."""

    def to_dict(self) -> dict:
        """Plain JSON-able numbers (the confusion matrix as nested ``{true: {pred: count}}``)."""
        return {
            "n_cells": self.n_cells,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "per_class_f1": dict(self.per_class_f1),
            "support": dict(self.support),
            "unknown_fraction": self.unknown_fraction,
            "accuracy_accepted": self.accuracy_accepted,
            "n_accepted": self.n_accepted,
            "confusion": {str(t): {str(p): int(v) for p, v in row.items()}
                          for t, row in self.confusion.iterrows()},
        }


def _labels(values: Sequence | np.ndarray | pd.Series, missing_as: str | None) -> np.ndarray:
    """Labels as a str object array; missing values (None, NaN, pd.NA) → ``missing_as``."""
    series = pd.Series(np.asarray(values, dtype=object))
    return series.where(series.notna(), missing_as).to_numpy(dtype=object)


def label_transfer(
    true: Sequence | np.ndarray | pd.Series,
    pred: Sequence | np.ndarray | pd.Series,
    *,
    unknown: str = UNKNOWN,
    ignore: Sequence[str] = ("", "undefined"),
) -> LabelTransfer:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix of predicted vs true labels.

    ``true`` and ``pred`` are the labels of the same cells, in the same order. Cells whose true
    label is missing or in ``ignore`` are not evaluated; a missing prediction counts as
    ``unknown``. See the module docstring for how ``unknown`` predictions are scored.

    Raises:
        ValueError: different lengths, no cell left to evaluate, or a true label equal to
            ``unknown`` (it would be scored as a correct rejection).
    """
    y_true = _labels(true, missing_as="")
    y_pred = _labels(pred, missing_as=unknown)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"true has {y_true.size} labels, pred has {y_pred.size}: they must be the same cells")
    keep = ~np.isin(y_true.astype(str), [str(x) for x in ignore]) & (y_true != "")
    y_true, y_pred = y_true[keep].astype(str), y_pred[keep].astype(str)
    if y_true.size == 0:
        raise ValueError(f"no cell has a true label outside {list(ignore)}: nothing to evaluate")
    if (y_true == unknown).any():
        raise ValueError(f"true labels contain {unknown!r}, the rejection label; rename it or pass another `unknown`")

    correct = y_true == y_pred
    rejected = y_pred == unknown
    accepted = ~rejected
    classes = sorted({str(c) for c in (*y_true, *y_pred)} - {unknown})
    f1 = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0.0)
    true_classes = sorted({str(c) for c in y_true})
    matrix = confusion_matrix(y_true, y_pred, labels=[*classes, unknown])
    rows = [classes.index(c) for c in true_classes]
    confusion = pd.DataFrame(matrix[rows], index=pd.Index(true_classes, name="true"),
                             columns=pd.Index([*classes, unknown], name="predicted"))
    return LabelTransfer(
        n_cells=int(y_true.size),
        accuracy=float(correct.mean()),
        macro_f1=float(np.mean(f1)),
        per_class_f1={c: float(v) for c, v in zip(classes, f1)},
        support={c: int((y_true == c).sum()) for c in true_classes},
        confusion=confusion,
        unknown_fraction=float(rejected.mean()),
        accuracy_accepted=float(correct[accepted].mean()) if accepted.any() else float("nan"),
        n_accepted=int(accepted.sum()),
    )


def rejection_auroc(is_unseen: Sequence[bool] | np.ndarray, confidence: Sequence[float] | np.ndarray) -> float:
    """AUROC of ``1 − confidence`` for telling cells of unseen types (``is_unseen`` True) apart.

    Raises:
        ValueError: different lengths, non-finite confidences, or only one of the two groups
            present (AUROC is undefined then).
    """
    unseen = np.asarray(is_unseen)
    conf = np.asarray(confidence, dtype=np.float64)
    if unseen.dtype != bool:
        raise ValueError(f"is_unseen must be booleans, got dtype {unseen.dtype}")
    if unseen.shape != conf.shape or unseen.ndim != 1:
        raise ValueError(f"is_unseen {unseen.shape} and confidence {conf.shape} must be the same 1-d length")
    if not np.isfinite(conf).all():
        raise ValueError("confidence holds NaN or infinite values")
    if unseen.all() or not unseen.any():
        raise ValueError("AUROC needs both unseen and seen cells; got only one group")
    return float(roc_auc_score(unseen, 1.0 - conf))


@dataclass(frozen=True)
class FeatureCorrelation:
    """Per-feature Pearson r between predicted and measured values, and its summaries."""

    per_feature: pd.Series
    """Pearson r of each feature across cells (NaN when either side is constant)."""
    mean: float
    """Mean over features with a defined r."""
    median: float
    min: float
    n_cells: int
    """Cells compared (rows present in both frames)."""

    def to_dict(self) -> dict:
        return {"mean": self.mean, "median": self.median, "min": self.min, "n_cells": self.n_cells,
                "per_feature": {str(k): (None if np.isnan(v) else float(v)) for k, v in self.per_feature.items()}}


def feature_pearson(pred: pd.DataFrame, measured: pd.DataFrame) -> FeatureCorrelation:
    """Pearson r across cells of each column of ``pred`` with the same-named column of ``measured``.

    Rows are matched by index (``measured`` must hold every row and column of ``pred``). Per
    feature, cells with a non-finite value on either side are left out (e.g. a NaN prediction:
    no measured neighbour); a feature with fewer than two such cells, or constant on either
    side, has r = NaN and is left out of the mean, median and minimum.
    """
    missing_cols = [c for c in pred.columns if c not in measured.columns]
    if missing_cols:
        raise ValueError(f"measured lacks feature(s) {missing_cols}")
    missing_rows = pred.index.difference(measured.index)
    if len(missing_rows):
        raise ValueError(f"measured lacks {len(missing_rows)} of the predicted cells (e.g. {missing_rows[0]!r})")
    if not pred.index.is_unique or not measured.index.is_unique:
        raise ValueError("cell ids (the frames' index) must be unique")
    x = pred.to_numpy(dtype=np.float64)
    y = measured.loc[pred.index, list(pred.columns)].to_numpy(dtype=np.float64)
    r = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        ok = np.isfinite(x[:, j]) & np.isfinite(y[:, j])
        if ok.sum() < 2:
            continue
        dx = x[ok, j] - x[ok, j].mean()
        dy = y[ok, j] - y[ok, j].mean()
        denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
        if denom > 0:
            r[j] = float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))
    per_feature = pd.Series(r, index=pred.columns, name="pearson_r")
    defined = r[~np.isnan(r)]

    def stat(f) -> float:
        return float(f(defined)) if defined.size else float("nan")

    return FeatureCorrelation(per_feature=per_feature, mean=stat(np.mean), median=stat(np.median),
                              min=stat(np.min), n_cells=int(x.shape[0]))
