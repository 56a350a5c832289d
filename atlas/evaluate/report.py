"""A mapping-quality report: the metrics of :mod:`atlas.evaluate.metrics` as Markdown, JSON and figures.

:func:`write_report` scores a mapped result (what :func:`atlas.map_query` returns) against the
query's true labels and measured proteins and writes, into one folder:

* ``metrics.json`` — every number (label transfer per level, protein Pearson r, thresholds, loss);
* ``report.md`` — the same numbers as tables, with links to the figures;
* ``umap_<level>.png`` — UMAP of the atlas embedding (``obsm["X_atlas"]``) coloured by the true
  label (``umap_batch.png`` coloured by batch when ``batch_key`` is given);
* ``confusion_<level>.png`` — the row-normalised confusion matrix;
* ``protein_best_<name>.png`` / ``protein_worst_<name>.png`` — predicted vs measured for the best
  and worst predicted protein;
* ``loss_curve.png`` — the build's training loss per epoch (when a manifest is given).

Plots use matplotlib's Agg backend (no display needed); the UMAP uses a fixed random state.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlas.evaluate.metrics import UNKNOWN, FeatureCorrelation, LabelTransfer, feature_pearson, label_transfer
from atlas.names import EMBEDDING, confidence_key, level_of, pred_key, profile_key

UMAP_RANDOM_STATE = 0


def _safe(name: str) -> str:
    """A file-name-safe form of a label level or feature name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "unnamed"


def _num(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def log_normalise_frame(counts: pd.DataFrame) -> pd.DataFrame:
    """:func:`atlas.evaluate.baselines.log_normalise_frame`, imported lazily (baselines pull in faiss)."""
    from atlas.evaluate.baselines import log_normalise_frame as normalise

    return normalise(counts)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def align_query(mapped: Any, query: Any) -> Any:
    """``query`` restricted and ordered to ``mapped``'s cells; ValueError when they are not the same cells."""
    m_ids, q_ids = pd.Index(mapped.obs_names.astype(str)), pd.Index(query.obs_names.astype(str))
    if not m_ids.is_unique or not q_ids.is_unique:
        raise ValueError("cell ids (obs_names) must be unique in both the mapped result and the query")
    missing = m_ids.difference(q_ids)
    if len(missing):
        raise ValueError(f"{len(missing)} of the {len(m_ids)} mapped cells are not in the query "
                         f"(e.g. {missing[0]!r}); give the query file that was mapped")
    if len(m_ids) != len(q_ids):
        raise ValueError(f"the query has {len(q_ids)} cells but the mapped result {len(m_ids)}; "
                         "give the query file that was mapped")
    if (m_ids == q_ids).all():
        return query
    return query[q_ids.get_indexer(m_ids)]


def infer_levels(mapped: Any, query: Any) -> list[str]:
    """Levels with a ``{level}_pred`` column in ``mapped`` and a ``{level}`` column in ``query``."""
    return [lv for c in mapped.obs.columns if (lv := level_of(c)) is not None and lv in query.obs.columns]


# --------------------------------------------------------------------------------------- figures


def _umap(mapped: Any, query: Any, out: Path, levels: Sequence[str], batch_key: str | None) -> list[str]:
    import anndata as ad
    import scanpy as sc

    emb = np.asarray(mapped.obsm[EMBEDDING], dtype=np.float32)
    obs = pd.DataFrame(index=mapped.obs_names.astype(str))
    for level in levels:
        obs[level] = pd.Categorical(query.obs[level].astype(str).to_numpy())
    if batch_key is not None:
        obs["batch"] = pd.Categorical(query.obs[batch_key].astype(str).to_numpy())
    tmp = ad.AnnData(obs=obs)
    tmp.obsm[EMBEDDING] = emb
    sc.pp.neighbors(tmp, n_neighbors=min(15, max(2, tmp.n_obs - 1)), use_rep=EMBEDDING,
                    random_state=UMAP_RANDOM_STATE)
    sc.tl.umap(tmp, random_state=UMAP_RANDOM_STATE)
    coords = tmp.obsm["X_umap"]

    plt = _plt()
    written = []
    columns = [(level, f"umap_{_safe(level)}.png") for level in levels]
    if batch_key is not None:
        columns.append(("batch", "umap_batch.png"))
    for column, name in columns:
        values = tmp.obs[column]
        fig, ax = plt.subplots(figsize=(7, 5.5))
        cmap = plt.get_cmap("tab20")
        for i, cat in enumerate(values.cat.categories):
            sel = (values == cat).to_numpy()
            ax.scatter(coords[sel, 0], coords[sel, 1], s=6, color=cmap(i % 20), label=f"{cat} ({sel.sum()})")
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        title = f"batch ({batch_key})" if column == "batch" else f"true {column}"
        ax.set_title(f"Atlas embedding (X_atlas), coloured by {title}")
        ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _confusion(result: LabelTransfer, level: str, path: Path) -> None:
    plt = _plt()
    counts = result.confusion
    rows = counts.sum(axis=1).replace(0, 1)
    norm = counts.div(rows, axis=0)
    n_r, n_c = norm.shape
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n_c + 3), max(4, 0.4 * n_r + 2)))
    im = ax.imshow(norm.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_c), [str(c) for c in norm.columns], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n_r), [f"{r} (n={counts.loc[r].sum()})" for r in norm.index], fontsize=7)
    if n_r * n_c <= 400:
        for i in range(n_r):
            for j in range(n_c):
                v = norm.iat[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{level}: row-normalised confusion (accuracy {result.accuracy:.3f})")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _protein_scatter(pred: pd.Series, measured: pd.Series, r: float, kind: str, path: Path) -> None:
    plt = _plt()
    x = measured.to_numpy(np.float64)
    y = pred.to_numpy(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(x[ok], y[ok], s=6, alpha=0.6)
    if ok.any():
        lo, hi = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"measured {pred.name} (log1p, 1e4 per cell)")
    ax.set_ylabel(f"predicted {pred.name}")
    ax.set_title(f"{kind} predicted protein: {pred.name} (Pearson r = {r:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loss_curve(epochs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    points = [(e.get("epoch", i), e.get("loss")) for i, e in enumerate(epochs)
              if isinstance(e, Mapping) and isinstance(e.get("loss"), (int, float))]
    if not points:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Build loss curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------- report


def compute_metrics(mapped: Any, query: Any, levels: Sequence[str],
                    protein_key: str = "protein_counts") -> tuple[dict[str, LabelTransfer], FeatureCorrelation | None]:
    """Label transfer per level and (when both sides have proteins) per-protein Pearson r."""
    labels = {}
    for level in levels:
        if pred_key(level) not in mapped.obs.columns:
            raise ValueError(f"the mapped result has no '{level}_pred' column (map with this level)")
        if level not in query.obs.columns:
            raise ValueError(f"the query has no obs column '{level}' with the true labels")
        labels[level] = label_transfer(query.obs[level].to_numpy(), mapped.obs[pred_key(level)].to_numpy())
    protein = None
    if profile_key("protein") in mapped.obsm and protein_key in query.obsm:
        pred = mapped.obsm[profile_key("protein")]
        counts = query.obsm[protein_key]
        if isinstance(pred, pd.DataFrame) and isinstance(counts, pd.DataFrame):
            pred = pred.copy()
            pred.index = mapped.obs_names.astype(str)
            counts = counts.copy()
            counts.index = query.obs_names.astype(str)
            measured = log_normalise_frame(counts)
            shared = [c for c in pred.columns if c in measured.columns]
            if shared:
                protein = feature_pearson(pred[shared], measured)
    return labels, protein


def write_report(
    mapped: Any,
    query: Any,
    out_dir: str | Path,
    *,
    levels: Sequence[str] | None = None,
    batch_key: str | None = None,
    protein_key: str = "protein_counts",
    manifest: Mapping[str, Any] | None = None,
    title: str = "Atlas mapping report",
    umap: bool = True,
    integration: bool = True,
) -> Path:
    """Score ``mapped`` against ``query`` and write ``report.md``, ``metrics.json`` and figures into ``out_dir``.

    ``mapped`` is :func:`atlas.map_query`'s result for ``query`` (same cells; the query may be in
    another order). ``levels`` default to every level predicted in ``mapped`` with true labels
    in ``query.obs``. With ``batch_key`` and ``integration``, the scIB integration scores of the
    query's embedding (first level's true labels, ``batch_key`` batches; at most
    :data:`INTEGRATION_MAX_CELLS` cells) are added. Returns the path of ``report.md``.

    Raises:
        ValueError: different cells, a level missing on either side, or no level to evaluate.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    query = align_query(mapped, query)
    levels = list(levels) if levels is not None else infer_levels(mapped, query)
    if not levels:
        raise ValueError("no label level to evaluate: the mapped result has no '{level}_pred' column "
                         "matching a query obs column")
    if batch_key is not None and batch_key not in query.obs.columns:
        raise ValueError(f"the query has no obs column '{batch_key}' (--batch-key)")
    if EMBEDDING not in mapped.obsm:
        raise ValueError("the mapped result has no obsm['X_atlas'] embedding; is it atlas.map_query's output?")

    labels, protein = compute_metrics(mapped, query, levels, protein_key)
    figures: dict[str, str] = {}

    if umap:
        for name in _umap(mapped, query, out, levels, batch_key):
            figures[name[: -len(".png")]] = name
    for level, result in labels.items():
        name = f"confusion_{_safe(level)}.png"
        _confusion(result, level, out / name)
        figures[f"confusion_{level}"] = name

    protein_files: dict[str, str] = {}
    if protein is not None:
        r = protein.per_feature.dropna()
        if len(r):
            pred = mapped.obsm[profile_key("protein")].copy()
            pred.index = mapped.obs_names.astype(str)
            counts = query.obsm[protein_key].copy()
            counts.index = query.obs_names.astype(str)
            measured = log_normalise_frame(counts)
            for kind, feature in (("best", r.idxmax()), ("worst", r.idxmin())):
                name = f"protein_{kind}_{_safe(feature)}.png"
                _protein_scatter(pred[feature], measured.loc[pred.index, feature], float(r[feature]),
                                 kind, out / name)
                protein_files[kind] = name
                figures[f"protein_{kind}"] = name

    epochs = list(((manifest or {}).get("metrics") or {}).get("epochs") or [])
    if manifest is not None and _loss_curve(epochs, out / "loss_curve.png"):
        figures["loss_curve"] = "loss_curve.png"
    thresholds = ((manifest or {}).get("mapping") or {}).get("thresholds") if manifest is not None else None

    scib = _integration(mapped, query, levels[0], batch_key) if (integration and batch_key) else None

    metrics: dict[str, Any] = {
        "integration": scib,
        "n_cells": int(mapped.n_obs),
        "levels": {level: res.to_dict() for level, res in labels.items()},
        "protein": protein.to_dict() if protein is not None else None,
        "thresholds": thresholds,
        "loss_curve": epochs or None,
        "figures": figures,
    }
    for level in levels:
        conf = confidence_key(level)
        if conf in mapped.obs.columns:
            metrics["levels"][level]["mean_confidence"] = float(np.nanmean(mapped.obs[conf].to_numpy(np.float64)))
    (out / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2, allow_nan=False), encoding="utf-8")

    md = _markdown(title, metrics, labels, protein, protein_files, figures, batch_key, manifest)
    path = out / "report.md"
    path.write_text(md, encoding="utf-8")
    return path


INTEGRATION_MAX_CELLS = 20_000
"""scIB scores are computed on a random sample (seed 0) of at most this many labelled cells."""


def _integration(mapped: Any, query: Any, level: str, batch_key: str) -> dict:
    """scIB scores of the mapped embedding, or ``{"skipped": why}``."""
    truth = query.obs[level].astype(str)
    keep = ~truth.isin(("", "nan", "undefined", UNKNOWN)).to_numpy()
    batches = query.obs[batch_key].astype(str).to_numpy()
    if len(np.unique(batches[keep])) < 2:
        return {"skipped": f"the query's labelled cells come from fewer than two '{batch_key}' batches"}
    if query.n_vars == 0:
        return {"skipped": "the query has no X to compute the unintegrated PCA from (PCR comparison needs it)"}
    try:
        import scib_metrics  # noqa: F401

        from atlas.evaluate.integration import integration_scores, pre_integration_pca
    except ImportError:
        return {"skipped": "scib-metrics is not installed (pip install -e '.[eval]')"}
    rows = np.flatnonzero(keep)
    if len(rows) > INTEGRATION_MAX_CELLS:
        rows = np.sort(np.random.default_rng(0).choice(rows, INTEGRATION_MAX_CELLS, replace=False))
    from atlas.evaluate.baselines import _log_normalised

    pre = pre_integration_pca(_log_normalised(query.X[rows]).toarray())
    scores = integration_scores(np.asarray(mapped.obsm[EMBEDDING])[rows], truth.to_numpy()[rows], batches[rows], pre)
    return {"level": level, "batch_key": batch_key, "n_cells": int(len(rows)), "scores": scores}


def _markdown(title, metrics, labels, protein, protein_files, figures, batch_key, manifest) -> str:
    lines = [f"# {title}", "", f"Cells mapped: {metrics['n_cells']}.", ""]
    if manifest is not None:
        version = manifest.get("atlas_version") or manifest.get("version")
        if version:
            lines += [f"Atlas version: `{version}`.", ""]
    lines += ["## Label transfer", "",
              "`unknown` (rejected) predictions count as wrong; cells without a true label are left out.", "",
              "| level | cells | accuracy | macro-F1 | unknown fraction | accuracy on accepted | accepted |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for level, r in labels.items():
        lines.append(f"| {level} | {r.n_cells} | {_num(r.accuracy)} | {_num(r.macro_f1)} | "
                     f"{_num(r.unknown_fraction)} | {_num(r.accuracy_accepted)} | {r.n_accepted} |")
    lines.append("")
    for level, r in labels.items():
        lines += [f"### {level}", "", "| class | support | F1 |", "|---|---:|---:|"]
        for cls, f1 in r.per_class_f1.items():
            lines.append(f"| {cls} | {r.support.get(cls, 0)} | {_num(f1)} |")
        lines += ["", f"![confusion {level}]({figures[f'confusion_{level}']})", ""]
        umap_name = f"umap_{_safe(level)}"
        if umap_name in figures:
            lines += [f"![UMAP coloured by {level}]({figures[umap_name]})", ""]
    if batch_key is not None and "umap_batch" in figures:
        lines += ["## Batches", "", f"![UMAP coloured by {batch_key}]({figures['umap_batch']})", ""]
    scib = metrics.get("integration")
    if scib and "skipped" in scib:
        lines += ["## Integration (scIB)", "", f"Not computed: {scib['skipped']}.", ""]
    elif scib:
        sc = scib["scores"]
        lines += ["## Integration (scIB)", "",
                  f"scib-metrics on the query embedding, {scib['n_cells']} labelled cells, labels "
                  f"`{scib['level']}`, batches `{scib['batch_key']}`; overall = 0.6 bio + 0.4 batch.", "",
                  "| overall | bio | batch | NMI | ARI | label ASW | isolated labels | cLISI | batch ASW | iLISI | "
                  "kBET | graph connectivity | PCR comparison |", "|" + "---:|" * 13,
                  "| " + " | ".join(_num(sc[k]) for k in ("overall", "bio", "batch", "nmi", "ari", "silhouette_label",
                                                           "isolated_labels", "clisi", "silhouette_batch", "ilisi",
                                                           "kbet", "graph_connectivity", "pcr_comparison")) + " |", ""]
    if protein is not None:
        lines += ["## Protein prediction", "",
                  f"Pearson r per protein across {protein.n_cells} cells, predicted vs measured "
                  "(measured on the atlas's scale: 1e4 per cell, log1p).", "",
                  f"Mean {_num(protein.mean)}, median {_num(protein.median)}, min {_num(protein.min)}.", "",
                  "| protein | Pearson r |", "|---|---:|"]
        for name, r in protein.per_feature.sort_values(ascending=False, na_position="last").items():
            lines.append(f"| {name} | {_num(float(r))} |")
        lines.append("")
        for kind, name in protein_files.items():
            lines += [f"![{kind} predicted protein]({name})", ""]
    if metrics.get("thresholds"):
        lines += ["## Rejection thresholds", "", "| level | threshold |", "|---|---:|"]
        for level, value in metrics["thresholds"].items():
            shown = _num(float(value)) if isinstance(value, (int, float)) else f"`{json.dumps(value)}`"
            lines.append(f"| {level} | {shown} |")
        lines.append("")
    if "loss_curve" in figures:
        lines += ["## Build loss curve", "", "| epoch | loss | cells/s |", "|---:|---:|---:|"]
        for e in metrics["loss_curve"]:
            cps = e.get("cells_per_s")
            lines.append(f"| {e.get('epoch', '')} | {_num(e.get('loss'))} | "
                         f"{'' if cps is None else f'{cps:.0f}'} |")
        lines += ["", f"![loss curve]({figures['loss_curve']})", ""]
    lines += ["All numbers: [metrics.json](metrics.json).", ""]
    return "\n".join(lines)
