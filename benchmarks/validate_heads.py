"""Choose how Concerto uses reference labels, on the *reference* only (never a scored query).

    python benchmarks/validate_heads.py [--tasks pbmc10k,liao] [--out benchmarks/out/heads]

Validation splits (the scored queries of ``benchmarks/quality.py`` are never read):

* ``pbmc10k``: the task's 80% reference, split again 80/20 at random (seed 2);
* ``liao``: the liao2020 cross-patient task's two reference patients; one is trained on, the
  other validates (the task's query patient is never read).

In-process with this project's modules (``build_model``, ``fit_local``, ``minibatches``) on the
same settings as the built atlases (batch 64, single-domain minibatches, lr 1e-3, 5 epochs), each
variant is scored by the kNN vote on its embedding (level 1 k = 25, level 2 k = 5 among the
reference cells of the predicted level-1 type, as mapping does), by the heads alone, and by the
two combined (mean of head probability and vote share). Results: ``OUT/results.{md,json}``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_tasks.common import data_file  # noqa: E402

EPOCHS, BATCH, LR = 5, 64, 1e-3


def _split_pbmc10k():
    import anndata as ad

    adata = ad.read_h5ad(data_file("pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"))
    reference = np.random.default_rng(0).random(adata.n_obs) < 0.8  # the task's split: query never read
    adata = adata[reference].copy()
    train = np.random.default_rng(2).random(adata.n_obs) < 0.8
    levels = ["cell_type_l1", "cell_type_l2"]
    return adata, train, levels, np.zeros(adata.n_obs, dtype=np.int64)


def _split_liao():
    import anndata as ad

    adata = ad.read_h5ad(data_file("liao2020_covid_balf_3patients_rna_labelled.h5ad"))
    adata = adata[adata.obs["annotated"].astype(bool).to_numpy()].copy()
    patients = sorted(adata.obs["patient"].astype(str).unique())
    reference_patients = patients[:2]  # the task maps the first two onto the third; the third is never read
    adata = adata[adata.obs["patient"].astype(str).isin(reference_patients).to_numpy()].copy()
    train = (adata.obs["patient"].astype(str) == reference_patients[0]).to_numpy()
    domain = pd.Categorical(adata.obs["patient"].astype(str)).codes.astype(np.int64)
    return adata, train, ["cell_type_coarse", "cell_type_fine"], domain


def as_mapped(pred: np.ndarray) -> np.ndarray:
    """Predictions as mapping reports them: a cell no labelled neighbour voted for (``""``, e.g.
    a level-2 vote among cells whose level 2 is undefined) is ``unknown`` — a refusal, not a
    class of its own (``label_transfer`` would average a ``""`` class's F1 of 0 into macro-F1)."""
    from atlas.names import UNKNOWN

    return np.where(np.asarray(pred, dtype=str) == "", UNKNOWN, np.asarray(pred, dtype=object))


def _codes(values: np.ndarray, classes: list[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(v, -1) for v in values], dtype=np.int64)


def _vote(sims: np.ndarray, labels: np.ndarray, k: int, allowed: np.ndarray | None = None):
    """Similarity-weighted vote of the k most similar reference cells (optionally among ``allowed``)."""
    from atlas.mapping.vote import weighted_vote

    s = sims if allowed is None else np.where(allowed, sims, -np.inf)
    top = np.argpartition(-s, kth=min(k, s.shape[1] - 1), axis=1)[:, :k]
    return weighted_vote(labels[top], np.take_along_axis(s, top, axis=1))


def _vote_shares(sims, labels, k, classes, allowed=None, power: float = 0.0):
    """[n, C] each class's share of the similarity-weighted vote of the ``k`` nearest (optionally
    among ``allowed``), each neighbour also weighted by its class's ``(n_c / n_max) ** -power``
    (``atlas.mapping.vote.balance_weights``, as mapping votes; 0: plain)."""
    from atlas.mapping.vote import balance_weights

    s = sims if allowed is None else np.where(allowed, sims, -np.inf)
    top = np.argpartition(-s, kth=min(k, s.shape[1] - 1), axis=1)[:, :k]
    w = np.clip(np.nan_to_num(np.take_along_axis(s, top, axis=1), neginf=0.0), 0, None)
    if power:
        names, counts = np.unique(labels[labels != ""], return_counts=True)
        factor = balance_weights(dict(zip(names, counts)), power)
        w = w * np.array([factor.get(str(v), 0.0) for v in labels])[top]
    codes = _codes(labels[top].ravel(), classes).reshape(top.shape)
    out = np.zeros((sims.shape[0], len(classes)))
    rows = np.repeat(np.arange(sims.shape[0]), k)
    ok = codes.ravel() >= 0
    np.add.at(out, (rows[ok], codes.ravel()[ok]), w.ravel()[ok])
    return out / np.clip(out.sum(1, keepdims=True), 1e-12, None)


def score(emb_ref, emb_val, ref_labels, val_labels, levels, probs=None):
    """Accuracy / macro-F1 per level of kNN, head and combined predictions."""
    from atlas.evaluate.metrics import label_transfer

    r = emb_ref / np.linalg.norm(emb_ref, axis=1, keepdims=True).clip(1e-12)
    v = emb_val / np.linalg.norm(emb_val, axis=1, keepdims=True).clip(1e-12)
    sims = v @ r.T
    l1, l2 = levels
    out = {}
    knn1, _ = _vote(sims, ref_labels[l1], 25)
    knn2, _ = _vote(sims, ref_labels[l2], 5, allowed=ref_labels[l1][None, :] == knn1[:, None])
    preds = {"knn": (knn1, knn2)}
    if probs is not None:
        classes1, classes2 = probs["classes"]
        p1, p2 = probs["p"]
        head1 = np.asarray(classes1)[p1.argmax(1)]
        parent = probs["parent"]  # level-2 class → its level-1 class
        allowed2 = np.array([[parent[c] == h for c in classes2] for h in head1])
        head2 = np.asarray(classes2)[np.where(allowed2, p2, -1).argmax(1)]
        preds["head"] = (head1, head2)
        c1 = 0.5 * p1 + 0.5 * _vote_shares(sims, ref_labels[l1], 25, classes1)
        comb1 = np.asarray(classes1)[c1.argmax(1)]
        allowed = ref_labels[l1][None, :] == comb1[:, None]
        c2 = 0.5 * p2 + 0.5 * _vote_shares(sims, ref_labels[l2], 5, classes2, allowed=allowed)
        allowed2 = np.array([[parent[c] == h for c in classes2] for h in comb1])
        comb2 = np.asarray(classes2)[np.where(allowed2, c2, -1).argmax(1)]
        preds["combined"] = (comb1, comb2)
    for name, (a, b) in preds.items():
        s1 = label_transfer(val_labels[l1], as_mapped(a))
        s2 = label_transfer(val_labels[l2], as_mapped(b))
        out[name] = {"l1_acc": round(float(s1.accuracy), 4), "l1_f1": round(float(s1.macro_f1), 4),
                     "l2_acc": round(float(s2.accuracy), 4), "l2_f1": round(float(s2.macro_f1), 4)}
    return out


def protein_scores(emb_ref, emb_val, protein, tr, va) -> dict:
    """Mean Pearson r over proteins (1e4 + log1p, as profiles are stored) of kNN predictions:
    plain and similarity-weighted means of the k nearest reference cells."""
    from atlas.evaluate.baselines import log_normalise_frame

    values = log_normalise_frame(protein).to_numpy(np.float32)
    ref, truth = values[tr], values[va]
    r = emb_ref / np.linalg.norm(emb_ref, axis=1, keepdims=True).clip(1e-12)
    v = emb_val / np.linalg.norm(emb_val, axis=1, keepdims=True).clip(1e-12)
    sims = v @ r.T
    out = {}
    for k in (10, 25, 50, 100):
        top = np.argpartition(-sims, kth=k - 1, axis=1)[:, :k]
        w = np.clip(np.take_along_axis(sims, top, axis=1), 0, None)
        for name, weights in (("mean", np.ones_like(w)), ("weighted", w), ("weighted^4", w**4)):
            pred = (ref[top] * weights[:, :, None]).sum(1) / weights.sum(1, keepdims=True).clip(1e-12)
            rs = [np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]
            out[f"k{k} {name}"] = round(float(np.nanmean(rs)), 4)
    return out


def run_task(name: str, loader, variants: dict) -> dict:
    from atlas.data.batches import csr_to_batch
    from atlas.models.config import ConcertoConfig, build_model
    from atlas.models.heads import class_weights
    from atlas.train.step import fit_local, minibatches

    adata, train, levels, domain = loader()
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    labels = {lv: adata.obs[lv].astype(str).replace({"nan": "", "undefined": ""}).to_numpy() for lv in levels}
    classes = [sorted(set(labels[lv][train]) - {""}) for lv in levels]
    codes = np.stack([_codes(labels[lv], c) for lv, c in zip(levels, classes)], axis=1)
    parent = {}
    for a, b in zip(labels[levels[0]][train], labels[levels[1]][train]):
        if a and b:
            parent.setdefault(b, a)
    batch = csr_to_batch({"RNA": counts}, domain=domain)
    batch["labels"] = torch.from_numpy(codes)
    n_domains = int(domain.max()) + 1
    tr, va = np.flatnonzero(train), np.flatnonzero(~train)
    from atlas.train.step import take_rows

    train_batch = take_rows(batch, torch.as_tensor(tr))
    val_batch = take_rows(batch, torch.as_tensor(va))
    val_batch["domain"] = torch.full_like(val_batch["domain"], -1) if name == "liao" else val_batch["domain"]
    ref_labels = {lv: labels[lv][tr] for lv in levels}
    val_labels = {lv: labels[lv][va] for lv in levels}
    print(f"[{name}] {tr.size} train / {va.size} validation cells, classes {[len(c) for c in classes]}", flush=True)

    results = {}
    for vname, v in variants.items():
        torch.manual_seed(0)
        cfg = ConcertoConfig(modalities=("RNA",), head_weight=v.get("head_weight", 0.0),
                             class_weight_power=v.get("power", 0.5))
        n_classes = tuple(len(c) for c in classes) if v.get("heads") else ()
        model = build_model(cfg, {"RNA": counts.shape[1]}, n_domains, n_classes)
        if model.heads is not None:
            for i in range(len(levels)):
                cw = class_weights(np.bincount(codes[tr, i][codes[tr, i] >= 0], minlength=len(classes[i])),
                                   v.get("power", 0.5))
                for heads in (model.heads, model.student_heads):
                    if heads is not None:
                        heads.class_weight(i).copy_(torch.from_numpy(cw))
        t = time.perf_counter()
        for phase in v["phases"]:
            model.head_weight = phase.get("head_weight", 0.0)
            model.contrastive_weight = phase.get("contrastive", 1.0)
            epochs = phase["epochs"]
            fit_local(model, lambda e, s=phase.get("seed", 0): minibatches(train_batch, BATCH, seed=s * 100 + e,
                                                                         by_domain=True),
                      epochs, phase.get("lr", LR), steps_per_epoch=max(1, tr.size // BATCH))
        seconds = time.perf_counter() - t
        emb_ref = model.embed(train_batch).numpy()
        emb_val = embed_validation(model, val_batch, v)
        probs = None
        if model.heads is not None:
            p = [x.numpy() for x in model.head_probabilities(torch.from_numpy(emb_val))]
            probs = {"classes": classes, "p": p, "parent": parent}
        results[vname] = {**score(emb_ref, emb_val, ref_labels, val_labels, levels, probs), "train_s": round(seconds, 1)}
        if "protein_counts" in adata.obsm:
            results[vname]["protein"] = protein_scores(emb_ref, emb_val, adata.obsm["protein_counts"], tr, va)
        print(f"[{name}] {vname}: {results[vname]}", flush=True)
    return results


def as_unseen_query(model, batch, layers: str = "input"):
    """``(adapted model, batch)``: ``batch``'s cells as one query domain the model never saw, with
    its own statistics in the input normalisation (the mapping default, ``layers="input"``) or in
    every normalisation layer (``"all"``, as ``domain_statistics="all"``)."""
    from atlas.models.recalibrate import with_query_domains
    from atlas.train.step import minibatches

    def as_query(cells, offset):
        return {**cells, "domain": torch.full_like(cells["domain"], offset)}

    def forward(adapted, offset):
        for b in minibatches(batch, 1024, shuffle=False, drop_last=False):
            adapted.embed(as_query(b, offset))

    adapted, offset = with_query_domains(model, 1, forward, layers=layers)
    return adapted, as_query(batch, offset)


def embed_validation(model, val_batch, variant) -> np.ndarray:
    """Validation cells embedded as a query: with their own statistics when their domain is unseen."""
    if bool((val_batch["domain"] >= 0).all()):
        return model.embed(val_batch).numpy()
    adapted, batch = as_unseen_query(model, val_batch)
    return adapted.embed(batch).numpy()


VARIANTS = {
    "contrastive only": {"phases": [{"epochs": EPOCHS}]},
    "joint (CE + contrastive), power 0.5": {"heads": True, "phases": [{"epochs": EPOCHS, "head_weight": 1.0}]},
    "contrastive, then CE + contrastive (2 ep)": {
        "heads": True, "phases": [{"epochs": EPOCHS}, {"epochs": 2, "head_weight": 1.0, "seed": 1}]},
    "contrastive, then CE only (2 ep)": {
        "heads": True, "phases": [{"epochs": EPOCHS}, {"epochs": 2, "head_weight": 1.0, "contrastive": 0.0,
                                                         "seed": 1}]},
    "joint, power 1 (balanced)": {"heads": True, "power": 1.0, "phases": [{"epochs": EPOCHS, "head_weight": 1.0}]},
    "joint, power 0 (none)": {"heads": True, "power": 0.0, "phases": [{"epochs": EPOCHS, "head_weight": 1.0}]},
    "joint, 10 epochs": {"heads": True, "phases": [{"epochs": 2 * EPOCHS, "head_weight": 1.0}]},
    "joint, head weight 3": {"heads": True, "phases": [{"epochs": EPOCHS, "head_weight": 3.0}]},
    "joint, head weight 0.3": {"heads": True, "phases": [{"epochs": EPOCHS, "head_weight": 0.3}]},
    "joint, head weight 10": {"heads": True, "phases": [{"epochs": EPOCHS, "head_weight": 10.0}]},
}


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def _closeness(emb_ref, emb_val, ref_l1, k: int):
    """``(closeness, relative)``: each validation cell's mean cosine similarity to its ``k`` nearest
    reference cells, and ``relative(voted)`` → that closeness over the voted class's typical one
    (the median of its reference cells' own leave-one-out closeness), capped at 1."""
    r, v = _normalise(emb_ref), _normalise(emb_val)
    closeness = np.sort(v @ r.T, axis=1)[:, -k:].mean(1)
    ref_sims = r @ r.T
    np.fill_diagonal(ref_sims, -np.inf)
    ref_close = np.sort(ref_sims, axis=1)[:, -k:].mean(1)
    typical = {c: np.median(ref_close[ref_l1 == c]) for c in set(ref_l1) if c}
    fallback = np.median(ref_close)

    def relative(voted):
        return np.minimum(closeness / np.array([typical.get(c, fallback) for c in voted]), 1.0)

    return closeness, relative


def _closeness_in_part(emb_ref, emb_val, ref_l1, k: int, cols: slice):
    """As :func:`_closeness`, but the neighbours are found in the whole embedding and their
    similarity measured in ``cols`` only (what the shards can return without a second search)."""
    r, v = _normalise(emb_ref), _normalise(emb_val)
    rp, vp = _normalise(emb_ref[:, cols]), _normalise(emb_val[:, cols])
    top = np.argpartition(-(v @ r.T), kth=k, axis=1)[:, :k]
    closeness = np.einsum("nd,nkd->nk", vp, rp[top]).mean(1)
    ref_sims = r @ r.T
    np.fill_diagonal(ref_sims, -np.inf)
    ref_top = np.argpartition(-ref_sims, kth=k, axis=1)[:, :k]
    ref_close = np.einsum("nd,nkd->nk", rp, rp[ref_top]).mean(1)
    typical = {c: np.median(ref_close[ref_l1 == c]) for c in set(ref_l1) if c}
    fallback = np.median(ref_close)

    def relative(voted):
        return np.minimum(closeness / np.array([typical.get(c, fallback) for c in voted]), 1.0)

    return closeness, relative


def rejection_scores(emb_ref, emb_val, ref_l1, p1, classes1, k: int = 25, half: int | None = None
                     ) -> dict[str, np.ndarray]:
    """Candidate unknown scores (higher = more likely a type the reference lacks); ``half``: the
    width of the teacher's part of a teacher + student embedding (then also scored per half)."""
    sims = _normalise(emb_val) @ _normalise(emb_ref).T
    vote, share = _vote(sims, ref_l1, k)
    closeness, relative_to = _closeness(emb_ref, emb_val, ref_l1, k)
    relative = relative_to(vote)
    out = {"1 - vote share": 1 - share, "1 - mean similarity of k nearest": 1 - closeness,
           "1 - similarity relative to the voted class": 1 - relative}
    if p1 is not None:
        index = {c: i for i, c in enumerate(classes1)}
        head_of_vote = np.array([p1[i, index[c]] if c in index else 0.0 for i, c in enumerate(vote)])
        out["1 - head max probability"] = 1 - p1.max(1)
        out["1 - head probability of the voted type"] = 1 - head_of_vote
        out["1 - vote share x head probability"] = 1 - share * head_of_vote
        out["1 - head probability x relative similarity"] = 1 - head_of_vote * relative
        out["1 - vote x head x relative similarity"] = 1 - share * head_of_vote * relative
        # As mapping scores it now: the vote weighted by label rarity (index.vote_balance 0.5).
        from validate_embedding import balanced_vote

        bvote, bshare = balanced_vote(sims, ref_l1, k, 0.5)
        bhead = np.array([p1[i, index[c]] if c in index else 0.0 for i, c in enumerate(bvote)])
        brel = relative_to(bvote)
        out["1 - balanced vote share"] = 1 - bshare
        out["1 - balanced vote x head probability (built before)"] = 1 - bshare * bhead
        out["1 - balanced vote x head x relative similarity"] = 1 - bshare * bhead * brel
        out["1 - head x relative similarity (balanced vote's label)"] = 1 - bhead * brel
        if half is not None:  # teacher + student: the distance measured in one network's half only
            for name, cols in (("teacher half", slice(0, half)), ("student half", slice(half, None))):
                h_rel = _closeness(emb_ref[:, cols], emb_val[:, cols], ref_l1, k)[1](bvote)
                out[f"1 - relative similarity, {name}"] = 1 - h_rel
                out[f"1 - balanced vote x head x relative similarity, {name}"] = 1 - bshare * bhead * h_rel
                out[f"1 - head x relative similarity, {name}"] = 1 - bhead * h_rel
            p_rel = _closeness_in_part(emb_ref, emb_val, ref_l1, k, slice(0, half))[1](bvote)
            out["1 - relative similarity, teacher half of whole-embedding neighbours"] = 1 - p_rel
            out["1 - balanced vote x head x relative similarity, teacher half of whole-embedding neighbours"] = (
                1 - bshare * bhead * p_rel)
            out["1 - head x relative similarity, teacher half of whole-embedding neighbours"] = 1 - bhead * p_rel
    return out


def fit_with_heads(train_batch: dict, n_genes: int, classes: list[list[str]] | None, codes: np.ndarray,
                   head_weight: float = 3.0, seed: int = 0):
    """An RNA Concerto model trained in-process at the atlas settings on ``train_batch``: with one
    head per level over ``classes`` (class weights power 0.5; ``codes`` [cells, levels] of the
    training cells), or contrastive only (``classes`` None)."""
    from atlas.models.config import ConcertoConfig, build_model
    from atlas.models.heads import class_weights
    from atlas.train.step import fit_local, minibatches

    torch.manual_seed(seed)
    model = build_model(ConcertoConfig(modalities=("RNA",), head_weight=head_weight), {"RNA": n_genes}, 1,
                        tuple(len(c) for c in classes) if classes else ())
    for i, level_classes in enumerate(classes or []):
        cw = class_weights(np.bincount(codes[:, i][codes[:, i] >= 0], minlength=len(level_classes)), 0.5)
        for h in (model.heads, model.student_heads):
            if h is not None:
                h.class_weight(i).copy_(torch.from_numpy(cw))
    fit_local(model, lambda e: minibatches(train_batch, BATCH, seed=e, by_domain=True), EPOCHS, LR,
              steps_per_epoch=max(1, int(train_batch["domain"].shape[0]) // BATCH))
    return model


def run_rejection(held_out_types=("NK", "B"), head_weights=(1.0,), seeds=(0,)) -> dict:
    """Leave one reference type out of training (pbmc10k validation split); AUROC of each score
    for "is the left-out type" over the validation cells with a level-1 label."""
    from sklearn.metrics import roc_auc_score

    from atlas.data.batches import csr_to_batch
    from atlas.train.step import take_rows

    adata, train, levels, domain = _split_pbmc10k()
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    labels = {lv: adata.obs[lv].astype(str).replace({"nan": "", "undefined": ""}).to_numpy() for lv in levels}
    batch = csr_to_batch({"RNA": counts}, domain=domain)
    out = {}
    for held in held_out_types:
        tr = np.flatnonzero(train & (labels[levels[0]] != held))
        va = np.flatnonzero(~train & (labels[levels[0]] != ""))
        classes = [sorted(set(labels[lv][tr]) - {""}) for lv in levels]
        codes = np.stack([_codes(labels[lv], c) for lv, c in zip(levels, classes)], axis=1)
        full = {**batch, "labels": torch.from_numpy(codes)}
        train_batch, val_batch = take_rows(full, torch.as_tensor(tr)), take_rows(full, torch.as_tensor(va))
        is_held = labels[levels[0]][va] == held
        for seed in seeds:
            for variant, heads, weight in ((("contrastive only", False, 0.0),) if 0.0 in head_weights else ()) + tuple(
                    (f"joint, head weight {w:g}", True, w) for w in head_weights if w > 0):
                model = fit_with_heads(train_batch, counts.shape[1], classes if heads else None, codes[tr], weight,
                                       seed)
                emb_ref, emb_val = model.embed(train_batch).numpy(), model.embed(val_batch).numpy()
                p1 = model.head_probabilities(torch.from_numpy(emb_val))[0].numpy() if heads else None
                scores = rejection_scores(emb_ref, emb_val, labels[levels[0]][tr], p1, classes[0],
                                          half=model.config.embed_dim if model.student_heads is not None else None)
                aurocs = {name: round(float(roc_auc_score(is_held, sc)), 4) for name, sc in scores.items()}
                name = f"{held} left out, {variant}" + (f", seed {seed}" if len(seeds) > 1 else "")
                out[name] = aurocs
                print(f"[rejection] {name}: {aurocs}", flush=True)
    return out


def run_adtnorm(head_weights=(0.0, 1.0, 3.0)) -> dict:
    """Held-out *reference studies* of ADTnorm (``validate_query_statistics.reference_split``): an
    atlas per head weight through the real build (task 3's settings), the two validation studies
    mapped with the default query statistics (``batch_key="batch"``), scored per study."""
    import ray
    from quality_tasks.common import map_with_atlas, start_ray
    from quality_tasks.protein_transfer import protein_query
    from validate_query_statistics import _scores, build_task_atlas, reference_split

    train, held, validation = reference_split()
    query, truth = protein_query(held, "batch"), held.obs[["cell_type_l1", "cell_type_l2"]].astype(str)
    study_of = held.obs["study_name"].astype(str).to_numpy()
    out_dir = Path(__file__).resolve().parent / "out" / "heads_adtnorm"
    results = {}
    for weight in head_weights:
        start_ray(2)
        try:
            built = build_task_atlas(out_dir, f"w{weight:g}", train, {"head_weight": weight})
        finally:
            ray.shutdown()
        mapped, _ = map_with_atlas(built["artifact"], query, ["cell_type_l1", "cell_type_l2"], batch_key="batch")
        row = {"all": _scores(mapped, truth), "build_s": round(built["build_s"], 1)}
        for study in validation:
            keep = study_of == study
            row[study] = _scores(mapped[keep], truth[keep])
        results[f"head weight {weight:g}"] = row
        print(f"[adtnorm] head weight {weight:g}: {row}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="pbmc10k,liao,rejection,adtnorm")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variant names' indices")
    parser.add_argument("--rejection-weights", default="1", help="rejection: head weights to compare")
    parser.add_argument("--held-out", default="NK,B", help="rejection: level-1 types left out, one model each")
    parser.add_argument("--seeds", default="0", help="rejection: model seeds (one model per type and seed)")
    parser.add_argument("--head-weights", default="0,1,3", help="adtnorm: the head weights to build atlases with")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "heads")
    args = parser.parse_args()
    torch.set_num_threads(2)
    variants = VARIANTS
    if args.variants:
        names = list(VARIANTS)
        variants = {names[int(i)]: VARIANTS[names[int(i)]] for i in args.variants.split(",")}
    loaders = {"pbmc10k": _split_pbmc10k, "liao": _split_liao}
    tasks = [t for t in args.tasks.split(",") if t]
    out = {t: run_task(t, loaders[t], variants) for t in tasks if t in loaders}
    if "rejection" in tasks:
        out["rejection"] = run_rejection(tuple(args.held_out.split(",")),
                                         tuple(float(w) for w in args.rejection_weights.split(",")),
                                         tuple(int(s) for s in args.seeds.split(",")))
    if "adtnorm" in tasks:
        out["adtnorm"] = run_adtnorm(tuple(float(w) for w in args.head_weights.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(out, indent=2))
    lines = []
    for task, res in out.items():
        if task == "adtnorm":
            lines += ["## ADTnorm, two held-out reference studies (level-1 acc / F1, level-2 acc / F1)", "",
                      "| head weight | " + " | ".join(k for k in next(iter(res.values())) if k != "build_s") + " |",
                      "|---|" + "---:|" * (len(next(iter(res.values()))) - 1)]
            for name, row in res.items():
                cells = [f"{v['cell_type_l1']['accuracy']:.3f} / {v['cell_type_l1']['macro_f1']:.3f}, "
                         f"{v['cell_type_l2']['accuracy']:.3f} / {v['cell_type_l2']['macro_f1']:.3f}"
                         for k, v in row.items() if k != "build_s"]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            continue
        if task == "rejection":
            names = list(dict.fromkeys(n for v in res.values() for n in v))
            lines += ["## unknown-type rejection (pbmc10k validation, one level-1 type left out), AUROC", "",
                      "| left out | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            lines += [f"| {k} | " + " | ".join(f"{v.get(n, float('nan')):.3f}" for n in names) + " |"
                      for k, v in res.items()]
            continue
        lines += [f"## {task}", "", "| variant | predictor | l1 acc | l1 F1 | l2 acc | l2 F1 | train s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for vname, r in res.items():
            for pred in ("knn", "head", "combined"):
                if pred in r:
                    s = r[pred]
                    lines.append(f"| {vname} | {pred} | {s['l1_acc']:.3f} | {s['l1_f1']:.3f} | {s['l2_acc']:.3f} | "
                                 f"{s['l2_f1']:.3f} | {r['train_s']} |")
        lines.append("")
        proteins = {v: r["protein"] for v, r in res.items() if "protein" in r}
        if proteins:
            names = list(next(iter(proteins.values())))
            lines += ["protein from RNA, mean Pearson r of kNN predictions:", "",
                      "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            lines += [f"| {v} | " + " | ".join(f"{p[n]:.3f}" for n in names) + " |" for v, p in proteins.items()]
            lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
