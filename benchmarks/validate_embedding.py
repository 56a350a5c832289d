"""Which embedding and which vote label a query best, chosen on the *reference* only.

    python benchmarks/validate_embedding.py [--tasks pbmc10k,liao,adtnorm,asap] [--seeds 0,1,2] [--models 0,5]
    python benchmarks/validate_embedding.py --models 5 --seeds 0,1,2 --ensemble
    python benchmarks/validate_embedding.py --models 5 --seeds 0,1,2 --pca-weights 0.5,2,4,inf

Same validation splits and settings as ``validate_heads.py`` (pbmc10k: the task's 80% reference
split again 80/20; liao: one reference patient trains, the other validates as an unseen domain;
the scored queries are never read; adtnorm: task 3's held-out reference studies; asap: reference
batch c1 trains, c2 validates as an unseen domain). Models (``--models``, indices into ``MODELS``), heads at the
default weight 3 where there are heads:

0. ``teacher heads`` — heads on the raw teacher output (the atlas before this comparison);
1. ``teacher + student heads`` — also heads on the raw student output (the sparse linear
   network over every measured feature), both trained;
2. ``heads on both, concatenated`` — one head over the two L2-normalised outputs concatenated;
3. ``contrastive only`` — no heads;
4. ``heads on the unit teacher`` — heads on the L2-normalised teacher output × ``HEAD_SCALE``;
5. ``unit heads on both networks`` — the model as built now (``embedding="teacher+student"``):
   each network's heads over its L2-normalised output × ``HEAD_SCALE``, trained separately.

Each model's teacher, student and concatenated (each L2-normalised) embeddings are scored by the
coarse-to-fine kNN vote (level 1 k 25; level 2 k 5 / 10 / 25 among the reference cells of the
predicted level-1 type) with a class-balanced vote (a neighbour's weight × ``(n_c / n_max) **
-power`` of its class ``c`` in the reference, power 0 / 0.5 / 1). Mean ± sd over ``--seeds``.
With ``--ensemble``, each model's seeds are also scored together: their concatenated embeddings
(each seed's unit teacher + student) vote as one (a deep ensemble's neighbours); on pbmc10k and
liao each seed and the ensemble are also scored in the atlas's label space, the embedding beside
the 50-component PCA of the log-normalised RNA (``ProfileSpace``). ``--pca-weights`` scores that
label space again with the PCA block weighed differently against the embedding (the build uses 1;
``inf`` votes in the PCA alone, the PCA + kNN peer's space).
Results: ``OUT/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validate_heads import (  # noqa: E402
    BATCH,
    EPOCHS,
    LR,
    _codes,
    _normalise,
    _split_liao,
    _split_pbmc10k,
    _vote_shares,
    as_mapped,
    as_unseen_query,
)

HEAD_WEIGHT = 3.0
MODELS = [("teacher heads", "teacher"), ("teacher + student heads", "dual"),
          ("heads on both, concatenated", "concat"), ("contrastive only", "none"),
          ("heads on the unit teacher", "unit teacher"), ("unit heads on both networks", "unit dual")]
UNIT_SCALE = 10.0
SEEDS = [0]
#: Which normalisation layers an unseen validation domain gets its own statistics in (--query-layers).
QUERY_LAYERS = ["input"]
#: --ensemble: also score each model's seeds side by side (their concatenated embeddings).
ENSEMBLE = False
#: --pca-weights: also score the label space at these weights of the PCA block beside the
#: embedding (``ProfileSpace.weight``; ``inf``: the PCA alone, as the PCA + kNN peer votes).
PCA_WEIGHTS: list[float] = []
#: --rules: also label by the heads alone and by vote share + head probability (model 5 only).
RULES = False


def balanced_vote(sims, labels, k, power, allowed=None):
    """Similarity-weighted vote of the k nearest, each neighbour also weighted by its class's
    ``(n_c / n_max) ** -power`` over the reference cells (as mapping votes)."""
    from atlas.mapping.vote import balance_weights, weighted_vote

    s = sims if allowed is None else np.where(allowed, sims, -np.inf)
    top = np.argpartition(-s, kth=min(k, s.shape[1] - 1), axis=1)[:, :k]
    classes, counts = np.unique(labels[labels != ""], return_counts=True)
    return weighted_vote(labels[top], np.take_along_axis(s, top, axis=1),
                         label_weight=balance_weights(dict(zip(classes, counts)), power))


def score_votes(emb_ref, emb_val, ref_labels, val_labels, levels) -> dict:
    from atlas.evaluate.metrics import label_transfer

    sims = _normalise(emb_val) @ _normalise(emb_ref).T
    l1, l2 = levels
    out = {}
    for power in (0.0, 0.5, 1.0):
        p1, _ = balanced_vote(sims, ref_labels[l1], 25, power)
        s1 = label_transfer(val_labels[l1], as_mapped(p1))
        for k2 in (5, 10, 25):
            allowed = ref_labels[l1][None, :] == p1[:, None]
            p2, _ = balanced_vote(sims, ref_labels[l2], k2, power, allowed=allowed)
            s2 = label_transfer(val_labels[l2], as_mapped(p2))
            out[f"power {power:g}, k2 {k2}"] = {
                "l1_acc": round(float(s1.accuracy), 4), "l1_f1": round(float(s1.macro_f1), 4),
                "l2_acc": round(float(s2.accuracy), 4), "l2_f1": round(float(s2.macro_f1), 4)}
    return out


def _head_loss(model, cfg, head_loss) -> None:
    """Replace the model's loss by NT-Xent + HEAD_WEIGHT × ``head_loss(model, t, s, labels)``."""
    from atlas.models.concerto import nt_xent

    def forward(b):
        views = model._views(b, with_student=True)
        keep = views["any"]
        t, s = views["teacher"][keep], views["student"][keep]
        contrastive = nt_xent(t, s, cfg.temperature, False)
        head = head_loss(model, t, s, b["labels"][keep])
        return {"loss": contrastive + HEAD_WEIGHT * head, "contrastive": contrastive.detach(),
                "head_loss": head.detach(), "n_cells": torch.tensor(float(t.shape[0])),
                "positive_cosine": torch.tensor(0.0)}

    model.forward = forward


def train(counts, codes, classes, tr, domain, heads: str, seed: int = 0, modality: str = "RNA",
          epochs: int = EPOCHS, batch_size: int = BATCH):
    from atlas.data.batches import csr_to_batch
    from atlas.models.config import ConcertoConfig, build_model
    from atlas.models.heads import LabelHeads, class_weights
    from atlas.train.step import fit_local, minibatches, take_rows

    batch = csr_to_batch({modality: counts}, domain=domain)
    batch["labels"] = torch.from_numpy(codes)
    torch.manual_seed(seed)
    # "unit dual" is the model as built (embedding "teacher+student": each network's heads over
    # its L2-normalised output); the other variants start from the teacher-only model.
    cfg = ConcertoConfig(modalities=(modality,), head_weight=HEAD_WEIGHT if heads != "none" else 0.0,
                         embedding="teacher+student" if heads == "unit dual" else "teacher")
    n_domains = int(domain.max()) + 1
    model = build_model(cfg, {modality: counts.shape[1]}, n_domains,
                        tuple(len(c) for c in classes) if heads != "none" else ())
    if heads != "none":
        weights = [torch.from_numpy(class_weights(np.bincount(codes[tr, i][codes[tr, i] >= 0],
                                                              minlength=len(classes[i])), 0.5))
                   for i in range(len(classes))]
        n_classes = tuple(len(c) for c in classes)
        if heads == "concat":  # one head per level over the two L2-normalised outputs concatenated
            model.heads = LabelHeads(2 * cfg.embed_dim, n_classes)
            _head_loss(model, cfg, lambda m, t, s, y: m.heads.loss(torch.cat([F.normalize(t, dim=1),
                                                                              F.normalize(s, dim=1)], 1), y)[0])
        elif heads == "unit teacher":  # a cosine classifier on the teacher: reads the stored teacher half
            _head_loss(model, cfg, lambda m, t, s, y: m.heads.loss(UNIT_SCALE * F.normalize(t, dim=1), y)[0])
        elif heads == "dual":  # heads on both raw outputs, each network's CE
            model.student_heads = LabelHeads(cfg.embed_dim, n_classes)
            _head_loss(model, cfg, lambda m, t, s, y: m.heads.loss(t, y)[0] + m.student_heads.loss(s, y)[0])
        for h in (model.heads, getattr(model, "student_heads", None)):
            if h is not None:
                for i, w in enumerate(weights):
                    h.class_weight(i).copy_(w)
    train_batch = take_rows(batch, torch.as_tensor(tr))
    t = time.perf_counter()
    fit_local(model, lambda e: minibatches(train_batch, batch_size, seed=seed * 100 + e, by_domain=True), epochs, LR,
              steps_per_epoch=max(1, tr.size // batch_size))
    return model, batch, time.perf_counter() - t


def embeddings(model, batch, unseen: bool) -> dict[str, np.ndarray]:
    """Teacher, student and concatenated embeddings (eval mode); ``unseen``: as a query of a new
    domain, with its own statistics (``--query-layers``: the input normalisation, the mapping
    default, or every layer)."""
    from atlas.models.concerto import eval_mode

    net, b = as_unseen_query(model, batch, QUERY_LAYERS[0]) if unseen else (model, batch)
    with torch.no_grad(), eval_mode(net):
        views = net._views(b, with_student=True)
    t, s = views["teacher"].numpy(), views["student"].numpy()
    return {"teacher": t, "student": s, "concat": np.hstack([_normalise(t), _normalise(s)])}


def _split_adtnorm():
    """Task 3's reference-only split (``validate_query_statistics.reference_split``): 60,000 cells of
    the training studies train; the two held-out *reference* studies validate, each an unseen
    domain with its own input statistics, as mapping with ``batch_key`` treats a query study."""
    import anndata as ad
    from validate_query_statistics import reference_split

    train, held, _ = reference_split()
    train = train[np.sort(np.random.default_rng(0).choice(train.n_obs, min(60_000, train.n_obs), replace=False))]
    adata = ad.concat([train, held])
    mask = np.r_[np.ones(train.n_obs, bool), np.zeros(held.n_obs, bool)]
    codes = pd.Categorical(train.obs["batch"].astype(str)).codes.astype(np.int64)
    domain = np.r_[codes, np.full(held.n_obs, -1)]
    adata.obs["validation_study"] = np.r_[np.full(train.n_obs, ""), held.obs["study_name"].astype(str).to_numpy()]
    return adata, mask, ["cell_type_l1", "cell_type_l2"], domain


def _split_asap():
    """Task 2's reference-only split: of the reference's two CITE-seq batches, c1 trains and c2
    validates as an unseen domain (the query's ASAP-seq batches c3, c4 are never read)."""
    import anndata as ad
    from quality_tasks.common import data_file

    adata = ad.read_h5ad(data_file("asap_cite_pbmc_adt216_4batches.h5ad"))
    adata = adata[adata.obs["batch"].astype(str).isin(["c1", "c2"]).to_numpy()].copy()
    adata.obs["cluster"] = "cluster " + adata.obs["cluster"].astype(str)
    train = (adata.obs["batch"].astype(str) == "c1").to_numpy()
    domain = np.where(train, 0, 1).astype(np.int64)
    return adata, train, ["coarse_cluster", "cluster"], domain


def _split_liao_reversed():
    """liao's two reference patients the other way round: the larger (C146, 1,292 cells) trains,
    the smaller (C144, 363) validates as an unseen domain (the third patient is never read)."""
    adata, train, levels, domain = _split_liao()
    return adata, ~train, levels, np.where(train, 1, 0).astype(np.int64)


def _split_mop():
    """Task 4's reference (``default_rng(0)`` 80%), RNA only: its 8 training libraries train
    (5,552 cells), the 4 held-out libraries of ``validate_cvqvae`` validate, each its own unseen
    domain (the query's cells are never read). Mouse motor cortex, SNARE-seq, 1,677 genes."""
    import anndata as ad
    from quality_tasks.common import data_file
    from quality_tasks.mop import BATCH_KEY, RNA_FILE, SPLIT_SEED
    from validate_cvqvae import validation_libraries

    adata = ad.read_h5ad(data_file(RNA_FILE))
    adata = adata[np.random.default_rng(SPLIT_SEED).random(adata.n_obs) < 0.8].copy()
    libraries = adata.obs[BATCH_KEY].astype(str).to_numpy()
    held = np.isin(libraries, validation_libraries(libraries))
    codes = pd.Categorical(libraries[~held]).codes.astype(np.int64)
    domain = np.full(adata.n_obs, -1, dtype=np.int64)
    domain[~held] = codes
    adata.obs["validation_study"] = np.where(held, libraries, "")
    return adata, ~held, ["cell_type_coarse", "cell_type_fine"], domain


#: The scored tasks' training settings (quality_tasks.adtnorm, quality_tasks.asap_cite).
SETTINGS = {"adtnorm": {"modality": "protein", "epochs": 2, "batch_size": 256},
            "asap": {"modality": "protein", "epochs": 5, "batch_size": 64}}
#: Tasks whose validation cells are an unseen domain mapped with their own input statistics.
UNSEEN = {"liao", "liao_reversed", "asap"}
#: Tasks whose label space (the embedding beside the PCA of RNA) is scored (--ensemble, --pca-weights).
RNA_TASKS = ("pbmc10k", "liao", "liao_reversed", "mop")


def run_task(name, loader) -> dict:
    adata, train_mask, levels, domain = loader()
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    labels = {lv: adata.obs[lv].astype(str).replace({"nan": "", "undefined": ""}).to_numpy() for lv in levels}
    classes = [sorted(set(labels[lv][train_mask]) - {""}) for lv in levels]
    codes = np.stack([_codes(labels[lv], c) for lv, c in zip(levels, classes)], axis=1)
    tr, va = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    from atlas.train.step import take_rows

    results = {}
    ref_labels, val_labels = ({lv: labels[lv][rows] for lv in levels} for rows in (tr, va))
    members: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    space = profile_coordinates(counts, tr, va) if (ENSEMBLE or PCA_WEIGHTS or RULES) and name in RNA_TASKS else None
    proteins = None
    if space is not None and "protein_counts" in adata.obsm:  # measured proteins, 1e4 + log1p
        from atlas.evaluate.baselines import log_normalise_frame

        proteins = log_normalise_frame(adata.obsm["protein_counts"]).to_numpy(np.float32)
    for (base_name, heads), seed in ((m, sd) for m in MODELS for sd in SEEDS):
        model, batch, seconds = train(counts, codes, classes, tr, domain, heads, seed, **SETTINGS.get(name, {}))
        model_name = f"{base_name}, seed {seed}"
        ref = embeddings(model, take_rows(batch, torch.as_tensor(tr)), unseen=False)
        if "validation_study" in adata.obs:  # each validation study (library) its own unseen domain
            study = adata.obs["validation_study"].to_numpy()[va]
            parts = [embeddings(model, take_rows(batch, torch.as_tensor(va[study == st])), unseen=True)
                     for st in sorted(set(study))]
            order = np.concatenate([np.flatnonzero(study == st) for st in sorted(set(study))])
            val = {k: np.empty((va.size, parts[0][k].shape[1]), np.float32) for k in parts[0]}
            for k in val:
                val[k][order] = np.concatenate([p[k] for p in parts])
        else:
            val = embeddings(model, take_rows(batch, torch.as_tensor(va)), unseen=name in UNSEEN)
        for emb in ("teacher", "student", "concat"):
            key = f"{model_name} / {emb}"
            results[key] = score_votes(ref[emb], val[emb], ref_labels, val_labels, levels)
            results[key]["train_s"] = round(seconds, 1)
            best = results[key]["power 0, k2 5"]
            print(f"[{name}] {key}: default vote {best}", flush=True)
        members.setdefault(base_name, []).append((ref["concat"], val["concat"]))
        if space is not None:  # the atlas's label space: the embedding beside a PCA of the RNA
            built = [space[0].vectors(e, c) for e, c in ((ref["concat"], space[1]), (val["concat"], space[2]))]
            for w in [space[0].weight, *PCA_WEIGHTS]:  # the build's weight (key without it), then the others
                key = f"{model_name} / concat beside PCA" + ("" if w == space[0].weight else f", weight {w:g}")
                vectors = built if w == space[0].weight else [
                    weighted_space(space[0], w, e, c) for e, c in ((ref["concat"], space[1]), (val["concat"], space[2]))]
                results[key] = score_votes(*vectors, ref_labels, val_labels, levels)
                if proteins is not None:
                    results[key]["protein"] = protein_scores(space[0], *vectors, proteins[tr], proteins[va])
                print(f"[{name}] {key}: as built {results[key]['power 0.5, k2 25']} "
                      f"{results[key].get('protein', '')}", flush=True)
            if RULES and heads == "unit dual":  # the label from the vote, the heads or both
                from atlas.mapping.heads import head_probabilities
                from atlas.models.concerto import embedding_head_weights

                probabilities = head_probabilities(val["concat"], embedding_head_weights(
                    model.config, model.state_dict(), len(levels)))
                key = f"{model_name} / label rules beside PCA"
                results[key] = rule_scores(*built, ref_labels, val_labels, levels, classes, probabilities)
                print(f"[{name}] {key}: {results[key]}", flush=True)
        if ENSEMBLE and len(members[base_name]) == len(SEEDS) > 1:
            # The seeds' models side by side: each one's unit embedding, concatenated.
            key = f"{base_name}, ensemble of {len(SEEDS)} seeds / concat"
            joined = [np.hstack([_normalise(m[i]) for m in members[base_name]]) for i in (0, 1)]
            results[key] = score_votes(joined[0], joined[1], ref_labels, val_labels, levels)
            print(f"[{name}] {key}: default vote {results[key]['power 0, k2 5']}", flush=True)
            if space is not None:
                key = f"{base_name}, ensemble of {len(SEEDS)} seeds / concat beside PCA"
                results[key] = score_votes(space[0].vectors(joined[0], space[1]), space[0].vectors(joined[1], space[2]),
                                           ref_labels, val_labels, levels)
    return results


def profile_coordinates(counts, tr, va):
    """``(ProfileSpace, reference coordinates, validation coordinates)``: the atlas's PCA of the
    log-normalised RNA, fitted on the training cells (``atlas.index.profile_space``)."""
    from atlas.data.batches import normalize_log1p
    from atlas.index.profile_space import ProfileSpace

    x = sp.csr_matrix(counts, dtype=np.float32)
    x.data = normalize_log1p(x.indptr, x.data)
    space = ProfileSpace.fit(x[tr])
    return space, space.project(x[tr]), space.project(x[va])


def rule_scores(ref, val, ref_labels, val_labels, levels, classes, probabilities) -> dict:
    """Level-1 and level-2 labels by four rules, coarse to fine as mapping does (k 25 / 25,
    balance 0.5): the kNN vote (as built), the heads alone (level 2 among the predicted level-1
    type's children), their mean (vote share + head probability) at both levels, and the mean at
    level 1 with the vote at level 2."""
    from atlas.evaluate.metrics import label_transfer

    sims = _normalise(val) @ _normalise(ref).T
    l1, l2 = levels
    children = {a: {b for x, b in zip(ref_labels[l1], ref_labels[l2]) if x == a and b} for a in classes[0]}
    out = {}
    v1 = _vote_shares(sims, ref_labels[l1], 25, classes[0], power=0.5)
    for rule in ("vote", "heads", "vote + heads", "vote + heads at level 1, vote at level 2"):
        score1 = v1 if rule == "vote" else probabilities[0] if rule == "heads" else (v1 + probabilities[0]) / 2
        p1 = np.asarray(classes[0])[score1.argmax(1)]
        allowed = ref_labels[l1][None, :] == p1[:, None]
        v2 = _vote_shares(sims, ref_labels[l2], 25, classes[1], allowed=allowed, power=0.5)
        mask = np.array([[c in children.get(a, ()) for c in classes[1]] for a in p1])
        h2 = probabilities[1] * mask
        h2 = h2 / np.maximum(h2.sum(1, keepdims=True), 1e-12)
        score2 = h2 if rule == "heads" else (v2 + h2) / 2 if rule == "vote + heads" else v2
        # A level-1 type without level-2 children has no fine shard: mapping calls level 2 unknown.
        p2 = np.where(mask.any(1), np.asarray(classes[1])[np.where(mask, score2, -1).argmax(1)], "")
        s1, s2 = label_transfer(val_labels[l1], as_mapped(p1)), label_transfer(val_labels[l2], as_mapped(p2))
        out[rule] = {"l1_acc": round(float(s1.accuracy), 4), "l1_f1": round(float(s1.macro_f1), 4),
                     "l2_acc": round(float(s2.accuracy), 4), "l2_f1": round(float(s2.macro_f1), 4)}
    return out


def protein_scores(space, ref: np.ndarray, val: np.ndarray, ref_proteins: np.ndarray,
                   val_proteins: np.ndarray, k: int = 25) -> dict:
    """Proteins of the validation cells from their ``k`` nearest training cells in ``ref``/``val``
    (unit vectors), softmax-weighted as the atlas predicts profiles: r per protein, mean / median."""
    from atlas.evaluate.metrics import feature_pearson

    sims = val @ ref.T
    top = np.argsort(-sims, axis=1)[:, :k]
    w = space.neighbour_weights(np.take_along_axis(sims, top, 1))
    pred = (w[:, :, None] * ref_proteins[top]).sum(1) / w.sum(1, keepdims=True)
    r = feature_pearson(pd.DataFrame(pred), pd.DataFrame(val_proteins))
    return {"r_mean": round(float(r.mean), 4), "r_median": round(float(r.median), 4)}


def weighted_space(space, weight: float, embedding: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """The label space's vectors with the PCA block at ``weight`` (``inf``: the PCA alone)."""
    from dataclasses import replace

    if np.isinf(weight):
        return _normalise(coords)
    return replace(space, weight=float(weight)).vectors(embedding, coords)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="pbmc10k,liao")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "embedding")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--head-scale", type=float, default=None, help="override the model's HEAD_SCALE")
    parser.add_argument("--models", default=None, help="comma-separated indices of MODELS")
    parser.add_argument("--query-layers", choices=("input", "all"), default="input",
                        help="unseen validation domains: own statistics in the input normalisation or in every layer")
    parser.add_argument("--ensemble", action="store_true",
                        help="also score an ensemble: each model's seeds' embeddings side by side")
    parser.add_argument("--rules", action="store_true",
                        help="also label by the heads alone and by vote share + head probability (model 5)")
    parser.add_argument("--pca-weights", default="",
                        help="also score the label space with the PCA block at these weights (e.g. 0.5,2,inf)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    SEEDS[:] = [int(x) for x in args.seeds.split(",")]
    global ENSEMBLE, RULES
    ENSEMBLE, RULES = args.ensemble, args.rules
    PCA_WEIGHTS[:] = [float(w) for w in args.pca_weights.split(",") if w]
    QUERY_LAYERS[:] = [args.query_layers]
    if args.head_scale is not None:
        import atlas.models.concerto as concerto

        concerto.HEAD_SCALE = args.head_scale
    if args.models:
        MODELS[:] = [MODELS[int(i)] for i in args.models.split(",")]
    loaders = {"pbmc10k": _split_pbmc10k, "liao": _split_liao, "liao_reversed": _split_liao_reversed,
               "mop": _split_mop, "adtnorm": _split_adtnorm, "asap": _split_asap}
    out = {t: run_task(t, loaders[t]) for t in args.tasks.split(",") if t}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=2))
    lines = []
    for task, res in out.items():
        import re

        groups: dict[tuple[str, str], list[dict]] = {}
        for key, votes in res.items():
            base = re.sub(r", seed \d+", "", key)
            for vote, sc in votes.items():
                if vote not in ("train_s", "protein"):
                    groups.setdefault((base, vote), []).append(sc)
        lines += [f"## {task}, mean ± sd over seeds {SEEDS}", "",
                  "| model / embedding | vote | l1 acc | l1 F1 | l2 acc | l2 F1 |", "|---|---|---:|---:|---:|---:|"]
        for (base, vote), rows in groups.items():
            cells = [f"{np.mean([r[m] for r in rows]):.3f} ± {np.std([r[m] for r in rows]):.3f}"
                     for m in ("l1_acc", "l1_f1", "l2_acc", "l2_f1")]
            lines.append(f"| {base} | {vote} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += [f"## {task}", "", "| model / embedding | vote | l1 acc / F1 | l2 acc / F1 |", "|---|---|---:|---:|"]
        for key, votes in res.items():
            for vote, s in votes.items():
                if vote in ("train_s", "protein"):
                    continue
                lines.append(f"| {key} | {vote} | {s['l1_acc']:.3f} / {s['l1_f1']:.3f} | "
                             f"{s['l2_acc']:.3f} / {s['l2_f1']:.3f} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
