"""Evaluation of mapping quality: the field's metrics and the baseline a user would otherwise run.

* :mod:`atlas.evaluate.metrics` — label transfer (accuracy, macro-F1, per-class F1, confusion),
  unseen-type rejection (AUROC) and missing-modality prediction (per-feature Pearson r); numpy
  and scikit-learn only, no Ray.
* :mod:`atlas.evaluate.baselines` — PCA + cosine kNN on the same features (Seurat/Azimuth-style).
* :mod:`atlas.evaluate.report` — :func:`write_report`: the metrics as ``report.md``, ``metrics.json``
  and figures (``atlas evaluate`` on the command line).

``benchmarks/mapping_quality.py`` runs both against an atlas on the pbmc10k split.
"""

from atlas.evaluate.metrics import (
    UNKNOWN,
    FeatureCorrelation,
    LabelTransfer,
    feature_pearson,
    label_transfer,
    rejection_auroc,
)
from atlas.evaluate.report import write_report

__all__ = [
    "UNKNOWN",
    "FeatureCorrelation",
    "LabelTransfer",
    "feature_pearson",
    "label_transfer",
    "rejection_auroc",
    "write_report",
]
