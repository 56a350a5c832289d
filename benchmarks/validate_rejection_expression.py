"""Does the query cell's *expression* tell an unseen cell type better than the embedding does?

    python benchmarks/validate_rejection_expression.py [--out benchmarks/out/rejection_expression]
    python benchmarks/validate_rejection_expression.py --pipeline "NK,CD4 T" [--workers 2]
    python benchmarks/validate_rejection_expression.py --tasks pbmc10k,liao --ensemble-seeds 0,1,2

A candidate for the unknown-type score (issue 11: CD8-removed AUROC ≥ 0.90): how badly the cell's
gene proportions ``p`` fit the best-fitting reference type's mean profile ``μ_t`` (level 1, mixed
with the reference's mean profile by ``ALPHA``), beside the confidence mapping uses today (balanced
vote share × head probability, teacher + student embedding). Misfit variants:

* ``cross-entropy``: ``min_t −Σ_g p_g log μ_tg`` (the multinomial log-likelihood per UMI);
* ``over the mean profile``: the same minus the reference mean profile's cross-entropy;
* ``KL, depth-corrected``: ``min_t KL(p ‖ μ_t)``, its dependence on the cell's log library size
  (quadratic, fitted on the reference cells) removed.

Each reference cell's misfit uses its own type's profile without itself (leave-one-out); a query
cell's *fit* is the fraction of reference cells that fit worse. Scores: the misfit alone and
``confidence × fit``. Reported per left-out type: AUROC for "is the left-out type", and at a
threshold that rejects 5% of the reference cells (as the build calibrates), the fraction of known
validation cells rejected and of unseen ones caught.

Reference-only splits (the scored queries are never read), one model per left-out type, trained
in-process at the atlas settings (``validate_heads.py``): pbmc10k — the task's 80% reference split
again 80/20, NK / B / CD4 T / monocytes left out of training; liao2020 — reference patient C144
trains, C146 validates as an unseen donor (input statistics), Epithelial / Macrophages / T left
out, and nothing left out (neutrophils: one C144 cell, 257 C146 cells — unseen in effect).

Embedding-side candidates (``--embedding-only`` scores only these): the teacher-half similarity to
the nearest reference cells relative to the voted type's (two forms), and how well the cell fits
the level-1 types as Gaussians in the embedding (:func:`mahalanobis`: plain and relative
Mahalanobis distance, alone and as ``confidence × min(1, fit / tau)`` for several ``tau``).
Measured, not adopted: the relative form separates a left-out type far better than today's
confidence within one run (in-process models and ``--pipeline`` atlases alike), but only because
the whole-reference Gaussian includes the reference's unlabelled cells, which sit where the
left-out type does; fitted on labelled cells only it is chance (README, rejection validation).

``confidence, vote share beside the PCA (as built)``: the confidence as an RNA atlas with
protein profiles computes it, its vote share taken beside the 50-component PCA of the RNA
(``ProfileSpace``, fitted on the training cells), where the atlas votes its labels; ``confidence
(today)`` is the same rule with votes in the embedding alone (the baseline of the earlier checks).

Head-side candidates (always scored): the level-1 heads' summed logits as an out-of-distribution
score (negative maximum logit, negative energy), and the teacher's and the student's heads apart
(each one's probability of the voted type, their minimum or product with the vote share, and
their Jensen-Shannon disagreement). Measured, not adopted: none beats today's confidence on the
mean over the eight splits (README, rejection validation).

``another run``: no model; the misfit of pbmc5k's cells (another 10x PBMC run, the same 4,000
genes, every type known to pbmc10k) against the pbmc10k reference split's profiles, and of the
held-out 20% of that split: the fraction rejected at the 5% reference-calibrated threshold (a
score that holds across runs rejects ≈ 5% of both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_tasks.common import data_file  # noqa: E402
from validate_embedding import balanced_vote, profile_coordinates  # noqa: E402
from validate_heads import _codes, _normalise, _split_liao, _split_pbmc10k, embed_validation, fit_with_heads  # noqa: E402

ALPHA = 0.01
K, BALANCE, RATE = 25, 0.5, 0.05
HELD_OUT = {"pbmc10k": ["NK", "B", "CD4 T", "monocytes"], "liao": ["Epithelial", "Macrophages", "T", "-"]}
#: liao: with nothing left out, the neutrophils (one training cell) are the unseen type.
UNSEEN_WITHOUT_LEFT_OUT = "Neutrophil"
#: Where the Mahalanobis fit starts to lower the confidence (a fit of 1: every reference cell fits worse).
TAUS = (1.0, 0.25, 0.1, 0.05, 0.02)


def train_left_out(task: str, adata, train, levels, domain, held: str, seed: int = 0) -> dict:
    """A model trained without ``held`` (level 1); embeddings and level-1 head probabilities."""
    from atlas.data.batches import csr_to_batch
    from atlas.train.step import take_rows

    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    labels = {lv: adata.obs[lv].astype(str).replace({"nan": "", "undefined": ""}).to_numpy() for lv in levels}
    tr = np.flatnonzero(train & (labels[levels[0]] != held))
    va = np.flatnonzero(~train & (labels[levels[0]] != ""))
    classes = [sorted(set(labels[lv][tr]) - {""}) for lv in levels]
    codes = np.stack([_codes(labels[lv], c) for lv, c in zip(levels, classes)], axis=1)
    full = {**csr_to_batch({"RNA": counts}, domain=domain), "labels": torch.from_numpy(codes)}
    train_batch, val_batch = take_rows(full, torch.as_tensor(tr)), take_rows(full, torch.as_tensor(va))
    if task == "liao":  # the validation patient is a donor the model never saw
        val_batch["domain"] = torch.full_like(val_batch["domain"], -1)
    model = fit_with_heads(train_batch, counts.shape[1], classes, codes[tr], 3.0, seed)
    emb_ref, emb_val = model.embed(train_batch).numpy(), embed_validation(model, val_batch, None)
    return {"tr": tr, "va": va, "classes": classes[0], "emb_ref": emb_ref, "emb_val": emb_val,
            "teacher_dim": int(model.config.embed_dim),
            "p_val": model.head_probabilities(torch.from_numpy(emb_val))[0].numpy(),
            "p_ref": model.head_probabilities(torch.from_numpy(emb_ref))[0].numpy(),
            "logits_val": head_logits(model, emb_val), "logits_ref": head_logits(model, emb_ref)}


@torch.no_grad()
def head_logits(model, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Level-1 logits of the teacher's head and of the student's (None without one), apart."""
    from atlas.models.concerto import HEAD_SCALE

    z, d = torch.from_numpy(emb).float(), int(model.config.embed_dim)
    teacher = model.heads.logits(HEAD_SCALE * z[:, :d])[0].numpy()
    if model.student_heads is None:
        return teacher, None
    return teacher, model.student_heads.logits(HEAD_SCALE * z[:, d:])[0].numpy()


def head_scores(logits: tuple[np.ndarray, np.ndarray | None], share: np.ndarray, vote: np.ndarray,
                classes: list[str]) -> dict[str, np.ndarray]:
    """Unknown scores (higher: more likely unseen) from the two heads' logits: the summed logits'
    maximum and energy (out-of-distribution scores of Hendrycks et al. 2022, Liu et al. 2020), and
    the two heads' agreement on the voted type. On the reference side the heads see their own
    training cells (not leave-one-out): that moves only the 5%-threshold columns, not AUROC."""
    from scipy.special import logsumexp, softmax

    teacher, student = logits
    total = teacher if student is None else teacher + student
    out = {"negative max logit": -total.max(1), "negative energy (logsumexp of logits)": -logsumexp(total, axis=1)}
    if student is None:
        return out
    index = {c: i for i, c in enumerate(classes)}
    col = np.array([index.get(c, -1) for c in vote])
    rows = np.arange(len(vote))
    pt, ps = softmax(teacher, axis=1), softmax(student, axis=1)
    pt_v = np.where(col >= 0, pt[rows, np.maximum(col, 0)], 0.0)
    ps_v = np.where(col >= 0, ps[rows, np.maximum(col, 0)], 0.0)
    m = (pt + ps) / 2
    js = 0.5 * (pt * np.log(np.maximum(pt, 1e-12) / m)).sum(1) + 0.5 * (ps * np.log(np.maximum(ps, 1e-12) / m)).sum(1)
    out["1 - vote share x teacher p x student p"] = 1 - share * pt_v * ps_v
    out["1 - vote share x min(teacher p, student p)"] = 1 - share * np.minimum(pt_v, ps_v)
    out["1 - min(teacher p, student p)"] = 1 - np.minimum(pt_v, ps_v)
    out["teacher-student Jensen-Shannon"] = js
    out["1 - teacher p"] = 1 - pt_v
    out["1 - student p"] = 1 - ps_v
    return out


def confidence(emb_ref, emb_query, ref_l1, p, classes,
               leave_one_out: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(balanced vote share × head probability of the voted type, the voted type, the share)``:
    the mapping rule for this embedding."""
    sims = _normalise(emb_query) @ _normalise(emb_ref).T
    if leave_one_out:
        np.fill_diagonal(sims, -np.inf)
    vote, share = balanced_vote(sims, ref_l1, K, BALANCE)
    index = {c: i for i, c in enumerate(classes)}
    return share * np.array([p[i, index[c]] if c in index else 0.0 for i, c in enumerate(vote)]), vote, share


def teacher_closeness(emb_ref: np.ndarray, emb_query: np.ndarray, ref_l1: np.ndarray, voted: np.ndarray,
                      width: int, leave_one_out: bool) -> np.ndarray:
    """``min(1, s / typical[voted])``: the cell's mean similarity to its K nearest reference cells
    in the teacher half of the embedding, over that of the voted type's reference cells to theirs
    (leave-one-out), as the teacher-only atlases' confidence has it."""
    r, q = _normalise(emb_ref[:, :width]), _normalise(emb_query[:, :width])

    def closeness(a, exclude_self):
        sims = a @ r.T
        if exclude_self:
            np.fill_diagonal(sims, -np.inf)
        return np.sort(sims, axis=1)[:, -K:].mean(1)

    own = closeness(r, True)
    return _relative(own, own if leave_one_out else closeness(q, False), ref_l1, voted)


def _relative(own: np.ndarray, close: np.ndarray, ref_l1: np.ndarray, voted: np.ndarray) -> np.ndarray:
    """``min(1, close / typical[voted])``, typical = the median of ``own`` over each type's cells."""
    typical = {c: float(np.median(own[ref_l1 == c])) for c in set(ref_l1) if c}
    fallback = float(np.median(own))
    return np.minimum(close / np.array([typical.get(c, fallback) for c in voted]), 1.0)


def teacher_closeness_joint(emb_ref: np.ndarray, emb_query: np.ndarray, ref_l1: np.ndarray, voted: np.ndarray,
                            width: int, leave_one_out: bool) -> np.ndarray:
    """:func:`teacher_closeness` over the K nearest reference cells of the *joint* embedding (the
    neighbours mapping already finds; no second search): their mean teacher-half similarity to the
    cell, over the voted type's typical value (reference, leave-one-out)."""
    joint_r = _normalise(emb_ref)
    r = _normalise(emb_ref[:, :width])

    def closeness(a_joint, a_teacher, exclude_self):
        sims = a_joint @ joint_r.T
        if exclude_self:
            np.fill_diagonal(sims, -np.inf)
        top = np.argpartition(-sims, kth=K, axis=1)[:, :K]
        return np.einsum("id,ikd->ik", a_teacher, r[top]).mean(1)

    own = closeness(joint_r, r, True)
    close = own if leave_one_out else closeness(_normalise(emb_query), _normalise(emb_query[:, :width]), False)
    return _relative(own, close, ref_l1, voted)


def mahalanobis(emb_ref: np.ndarray, emb_query: np.ndarray, ref_l1: np.ndarray, leave_one_out: bool,
                relative: bool = False, labelled_background: bool = False) -> np.ndarray:
    """The cell's smallest Mahalanobis distance to a level-1 type's mean in the (L2-normalised)
    embedding, under one covariance shared by the types (Ledoit-Wolf shrinkage): a class-conditional
    Gaussian, which weighs the directions in which known types are tight (those that tell close
    types apart) above those in which they spread. ``relative``: minus the distance under one
    Gaussian of all reference cells (Ren et al. 2021), which discounts what every type shares —
    unlabelled ones included, unless ``labelled_background``. ``leave_one_out`` (the query is the
    reference): a cell's own type's mean without the cell."""
    from sklearn.covariance import LedoitWolf

    r, q = _normalise(emb_ref), _normalise(emb_query)
    types = sorted(set(ref_l1) - {""})
    means = np.stack([r[ref_l1 == t].mean(0) for t in types])
    own = np.array([types.index(t) if t in types else -1 for t in ref_l1])
    precision = LedoitWolf().fit(r[own >= 0] - means[own[own >= 0]]).precision_

    def distance(x, centre, prec):
        diff = x - centre
        return np.einsum("id,de,ie->i", diff, prec, diff)

    d = np.stack([distance(q, m, precision) for m in means], axis=1)
    if leave_one_out:  # x − mean without x = (x − mean) · n / (n − 1)
        n_t = np.array([(ref_l1 == t).sum() for t in types], float)
        rows = np.flatnonzero(own >= 0)
        d[rows, own[rows]] *= (n_t[own[rows]] / np.maximum(n_t[own[rows]] - 1, 1)) ** 2
    best = d.min(1)
    if relative:
        background = LedoitWolf().fit(r[own >= 0] if labelled_background else r)
        best = best - distance(q, background.location_, background.precision_)
    return best


def _fit(mis_val: np.ndarray, mis_ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A misfit as a fit: the fraction of reference cells that fit worse."""
    ordered = np.sort(mis_ref)
    return (1 - np.searchsorted(ordered, mis_val) / ordered.size,
            1 - np.searchsorted(ordered, mis_ref) / ordered.size)


def misfits(proportions: sp.csr_matrix, library: np.ndarray, tr: np.ndarray, va: np.ndarray, ref_l1: np.ndarray,
            types: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per variant ``(validation misfit, reference misfit leave-one-out)``."""
    pr, pv = proportions[tr], proportions[va]
    n_genes = pr.shape[1]
    sums = np.stack([np.asarray(pr[ref_l1 == t].sum(0)).ravel() for t in types])
    n_t = np.array([(ref_l1 == t).sum() for t in types], float)
    mean = np.asarray(pr.mean(0)).ravel()
    floor = 1e-3 / n_genes
    mu = (1 - ALPHA) * sums / n_t[:, None] + ALPHA * mean[None] + floor
    log_mu = np.log(mu / mu.sum(1, keepdims=True))
    ce_val = -np.asarray(pv @ log_mu.T)
    ce_ref = -np.asarray(pr @ log_mu.T)
    own: dict[str, int] = {t: i for i, t in enumerate(types)}
    for i in range(pr.shape[0]):  # the cell's own type's profile without the cell
        t = own.get(str(ref_l1[i]))
        if t is None or n_t[t] < 2:
            continue
        row = pr[i]
        m = (1 - ALPHA) * (sums[t, row.indices] - row.data) / (n_t[t] - 1) + ALPHA * mean[row.indices] + floor
        ce_ref[i, t] = -(row.data @ np.log(m / mu[t].sum()))
    log_mean = np.log((mean + floor) / (mean + floor).sum())
    best_val, best_ref = ce_val.min(1), ce_ref.min(1)

    def entropy(x):
        d = x.copy()
        d.data = -d.data * np.log(d.data)
        return np.asarray(d.sum(1)).ravel()

    kl_val, kl_ref = best_val - entropy(pv), best_ref - entropy(pr)
    depth = lambda rows: np.stack([np.ones(rows.size), np.log(library[rows]), np.log(library[rows]) ** 2], 1)  # noqa: E731
    coef = np.linalg.lstsq(depth(tr), kl_ref, rcond=None)[0]
    return {"cross-entropy": (best_val, best_ref),
            "cross-entropy over the mean profile's": (best_val + pv @ log_mean, best_ref + pr @ log_mean),
            "KL, depth-corrected": (kl_val - depth(va) @ coef, kl_ref - depth(tr) @ coef)}


def evaluate(unknown_val: np.ndarray, unknown_ref: np.ndarray, is_unseen: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    threshold = np.quantile(unknown_ref, 1 - RATE)
    rejected = unknown_val > threshold
    return {"auroc": round(float(roc_auc_score(is_unseen, unknown_val)), 4),
            "known_rejected": round(float(rejected[~is_unseen].mean()), 4),
            "unseen_caught": round(float(rejected[is_unseen].mean()), 4)}


def run(task: str, only_embedding: bool = False) -> dict:
    adata, train, levels, domain = (_split_liao if task == "liao" else _split_pbmc10k)()
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X).astype(np.float64)
    library = np.maximum(np.asarray(counts.sum(1)).ravel(), 1)
    proportions = sp.csr_matrix(sp.diags(1 / library) @ counts)
    l1 = adata.obs[levels[0]].astype(str).replace({"nan": "", "undefined": ""}).to_numpy()
    out = {}
    for held in HELD_OUT[task]:
        t0 = time.perf_counter()
        m = train_left_out(task, adata, train, levels, domain, held)
        tr, va, classes = m["tr"], m["va"], m["classes"]
        ref_l1 = l1[tr]
        is_unseen = l1[va] == (held if held != "-" else UNSEEN_WITHOUT_LEFT_OUT)
        conf_val, vote_val, share_val = confidence(m["emb_ref"], m["emb_val"], ref_l1, m["p_val"], classes, False)
        conf_ref, vote_ref, share_ref = confidence(m["emb_ref"], m["emb_ref"], ref_l1, m["p_ref"], classes, True)
        row = {"confidence (today)": evaluate(1 - conf_val, 1 - conf_ref, is_unseen)}
        # The built atlas (RNA with protein profiles) votes its labels beside a PCA of the RNA, so its
        # confidence's vote share comes from that space.
        space, pca_ref, pca_val = profile_coordinates(counts, tr, va)
        vectors_ref = space.vectors(m["emb_ref"], pca_ref)
        prof_val, _, _ = confidence(vectors_ref, space.vectors(m["emb_val"], pca_val), ref_l1, m["p_val"], classes,
                                    False)
        prof_ref, _, _ = confidence(vectors_ref, vectors_ref, ref_l1, m["p_ref"], classes, True)
        row["confidence, vote share beside the PCA (as built)"] = evaluate(1 - prof_val, 1 - prof_ref, is_unseen)
        heads_val = head_scores(m["logits_val"], share_val, vote_val, classes)
        heads_ref = head_scores(m["logits_ref"], share_ref, vote_ref, classes)
        for name in heads_val:
            row[name] = evaluate(heads_val[name], heads_ref[name], is_unseen)
        rel_val = teacher_closeness(m["emb_ref"], m["emb_val"], ref_l1, vote_val, m["teacher_dim"], False)
        rel_ref = teacher_closeness(m["emb_ref"], m["emb_ref"], ref_l1, vote_ref, m["teacher_dim"], True)
        row["confidence x relative similarity, teacher half"] = evaluate(1 - conf_val * rel_val, 1 - conf_ref * rel_ref,
                                                                          is_unseen)
        rel_val = teacher_closeness_joint(m["emb_ref"], m["emb_val"], ref_l1, vote_val, m["teacher_dim"], False)
        rel_ref = teacher_closeness_joint(m["emb_ref"], m["emb_ref"], ref_l1, vote_ref, m["teacher_dim"], True)
        row["confidence x relative teacher similarity to the joint neighbours"] = evaluate(
            1 - conf_val * rel_val, 1 - conf_ref * rel_ref, is_unseen)
        for relative in (False, True):
            mis_val = mahalanobis(m["emb_ref"], m["emb_val"], ref_l1, False, relative)
            mis_ref = mahalanobis(m["emb_ref"], m["emb_ref"], ref_l1, True, relative)
            fit_val, fit_ref = _fit(mis_val, mis_ref)
            name = "relative Mahalanobis" if relative else "Mahalanobis"
            row[name] = evaluate(mis_val, mis_ref, is_unseen)
            for tau in TAUS if relative else (1.0,):
                row[f"confidence x min(1, {name} fit / {tau})"] = evaluate(
                    1 - conf_val * np.minimum(1, fit_val / tau), 1 - conf_ref * np.minimum(1, fit_ref / tau), is_unseen)
        expression = {} if only_embedding else misfits(proportions, library, tr, va, ref_l1,
                                                        [c for c in classes if (ref_l1 == c).any()])
        for name, (mis_val, mis_ref) in expression.items():
            fit_val, fit_ref = _fit(mis_val, mis_ref)
            row[f"{name}"] = evaluate(mis_val, mis_ref, is_unseen)
            row[f"confidence x fit ({name})"] = evaluate(1 - conf_val * fit_val, 1 - conf_ref * fit_ref, is_unseen)
        key = f"{task}: {held if held != '-' else 'nothing (neutrophils)'} left out"
        out[key] = {"unseen_cells": int(is_unseen.sum()), "cells": int(va.size), "scores": row,
                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[{key}] " + "; ".join(f"{n}: {v}" for n, v in row.items()), flush=True)
    return out


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.maximum(p, 1e-12))).sum(1)


def run_ensemble(task: str, seeds: list[int]) -> dict:
    """Deep-ensemble candidates (Lakshminarayanan et al. 2017): one model per seed, each trained
    without the left-out type as in :func:`run`; scores from their agreement — the mean
    confidence, the mean head probabilities' maximum, their mutual information (BALD), the
    confidence times the share of members voting the first member's type, and today's rule on the
    members' embeddings side by side with the mean head probabilities. Also level-1 accuracy on
    the known validation cells: the first member's vote against the joined embeddings' vote."""
    adata, train, levels, domain = (_split_liao if task == "liao" else _split_pbmc10k)()
    l1 = adata.obs[levels[0]].astype(str).replace({"nan": "", "undefined": ""}).to_numpy()
    out = {}
    for held in HELD_OUT[task]:
        t0 = time.perf_counter()
        members = [train_left_out(task, adata, train, levels, domain, held, seed=s) for s in seeds]
        tr, va, classes = members[0]["tr"], members[0]["va"], members[0]["classes"]
        ref_l1 = l1[tr]
        is_unseen = l1[va] == (held if held != "-" else UNSEEN_WITHOUT_LEFT_OUT)
        val = [confidence(m["emb_ref"], m["emb_val"], ref_l1, m["p_val"], classes, False) for m in members]
        ref = [confidence(m["emb_ref"], m["emb_ref"], ref_l1, m["p_ref"], classes, True) for m in members]
        p_val = np.mean([m["p_val"] for m in members], axis=0)
        p_ref = np.mean([m["p_ref"] for m in members], axis=0)
        mean_val, mean_ref = np.mean([c[0] for c in val], axis=0), np.mean([c[0] for c in ref], axis=0)
        agree_val = np.mean([c[1] == val[0][1] for c in val], axis=0)
        agree_ref = np.mean([c[1] == ref[0][1] for c in ref], axis=0)
        mi_val = _entropy(p_val) - np.mean([_entropy(m["p_val"]) for m in members], axis=0)
        mi_ref = _entropy(p_ref) - np.mean([_entropy(m["p_ref"]) for m in members], axis=0)
        joined_ref = np.hstack([_normalise(m["emb_ref"]) for m in members])
        joined_val = np.hstack([_normalise(m["emb_val"]) for m in members])
        j_val, j_vote, _ = confidence(joined_ref, joined_val, ref_l1, p_val, classes, False)
        j_ref, _, _ = confidence(joined_ref, joined_ref, ref_l1, p_ref, classes, True)
        row = {"confidence, first member (today)": evaluate(1 - val[0][0], 1 - ref[0][0], is_unseen),
               "mean confidence": evaluate(1 - mean_val, 1 - mean_ref, is_unseen),
               "1 - max of the mean head probabilities": evaluate(1 - p_val.max(1), 1 - p_ref.max(1), is_unseen),
               "mutual information (BALD)": evaluate(mi_val, mi_ref, is_unseen),
               "1 - mean confidence x vote agreement": evaluate(1 - mean_val * agree_val, 1 - mean_ref * agree_ref,
                                                                is_unseen),
               "confidence on the joined embeddings": evaluate(1 - j_val, 1 - j_ref, is_unseen)}
        known = ~is_unseen & (l1[va] != "")
        accuracy = {"first member": round(float((val[0][1] == l1[va])[known].mean()), 4),
                    "joined embeddings": round(float((j_vote == l1[va])[known].mean()), 4)}
        key = f"{task}: {held if held != '-' else 'nothing (neutrophils)'} left out"
        out[key] = {"unseen_cells": int(is_unseen.sum()), "cells": int(va.size), "scores": row,
                    "known_accuracy": accuracy, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[{key}] accuracy {accuracy}; " + "; ".join(f"{n}: {v}" for n, v in row.items()), flush=True)
    return out


def run_pipeline(held_out: list[str], workers: int = 2) -> dict:
    """The relative Mahalanobis fit in atlases the pipeline builds (``mapping_quality.build_concerto``:
    Ray Train, ``workers`` workers, 5 epochs, the task's build config) on the same pbmc10k split, one
    level-1 type left out: AUROC of 1 − level-1 confidence as mapped (thresholds off), of that
    confidence × ``min(1, fit / tau)`` and of the misfit alone. The reference cells' misfits (own
    type's mean without the cell) come from mapping them through the same atlas."""
    import mapping_quality as mq
    import ray
    from quality_tasks.common import start_ray
    from sklearn.metrics import roc_auc_score

    adata, train, _, _ = _split_pbmc10k()
    l1 = adata.obs["cell_type_l1"].astype(str).replace({"nan": "", "undefined": ""}).to_numpy()
    out_dir = Path(__file__).resolve().parent / "out" / "rejection_pipeline"
    out = {}
    for held in held_out:
        reference = adata[train & (l1 != held)].copy()
        query = adata[~train].copy()
        query.obsm.clear()  # RNA only, as the task's query
        start_ray(workers)
        try:
            built = mq.build_concerto(out_dir, f"without_{held.replace(' ', '_')}_w{workers}", reference, epochs=5,
                                      workers=workers)
        finally:
            ray.shutdown()
        mapped_q, _, _, _ = mq.map_concerto(built["artifact"], query, thresholds=None)
        as_query = reference.copy()
        as_query.obsm.clear()
        mapped_r, _, _, _ = mq.map_concerto(built["artifact"], as_query, thresholds=None)
        ref_l1, val_l1 = l1[train & (l1 != held)], l1[~train]
        mis_val = mahalanobis(mapped_r.obsm["X_atlas"], mapped_q.obsm["X_atlas"], ref_l1, False, True)
        mis_ref = mahalanobis(mapped_r.obsm["X_atlas"], mapped_r.obsm["X_atlas"], ref_l1, True, True)
        fit_val, _ = _fit(mis_val, mis_ref)
        conf = mapped_q.obs["cell_type_l1_confidence"].to_numpy().astype(float)
        labelled = val_l1 != ""
        y = (val_l1 == held)[labelled]
        row = {"confidence (today)": roc_auc_score(y, -conf[labelled]),
               "relative Mahalanobis": roc_auc_score(y, mis_val[labelled])}
        # The same with the whole-reference Gaussian fitted on labelled cells only.
        only = mahalanobis(mapped_r.obsm["X_atlas"], mapped_q.obsm["X_atlas"], ref_l1, False, True, True)
        only_ref = mahalanobis(mapped_r.obsm["X_atlas"], mapped_r.obsm["X_atlas"], ref_l1, True, True, True)
        row["relative Mahalanobis, labelled background"] = roc_auc_score(y, only[labelled])
        row["confidence x min(1, fit / 0.25), labelled background"] = roc_auc_score(
            y, -(conf * np.minimum(1, _fit(only, only_ref)[0] / 0.25))[labelled])
        row["unlabelled reference cells"] = int((ref_l1 == "").sum())
        for tau in TAUS:
            row[f"confidence x min(1, fit / {tau})"] = roc_auc_score(
                y, -(conf * np.minimum(1, fit_val / tau))[labelled])
        key = f"pbmc10k pipeline ({workers} worker(s)): {held} left out"
        out[key] = {k: round(float(v), 4) for k, v in row.items()}
        print(f"[{key}] {out[key]}", flush=True)
    return out


def another_run() -> dict:
    """Fraction of known cells each misfit rejects at the 5% threshold: same run vs another run."""
    import anndata as ad

    adata, train, levels, _ = _split_pbmc10k()
    query = ad.read_h5ad(data_file("pbmc5k_10x_totalvi_rna4000hvg_noprotein.h5ad"))
    if list(query.var_names) != list(adata.var_names):
        raise SystemExit("pbmc5k and pbmc10k do not share their 4,000 genes in order")
    counts = sp.vstack([sp.csr_matrix(a.layers["counts"] if "counts" in a.layers else a.X) for a in (adata, query)],
                       format="csr").astype(np.float64)
    library = np.maximum(np.asarray(counts.sum(1)).ravel(), 1)
    proportions = sp.csr_matrix(sp.diags(1 / library) @ counts)
    l1 = np.concatenate([adata.obs[levels[0]].astype(str).replace({"nan": "", "undefined": ""}).to_numpy(),
                         np.full(query.n_obs, "")])
    tr = np.flatnonzero(np.concatenate([train, np.zeros(query.n_obs, bool)]) & (l1 != ""))
    types = sorted(set(l1[tr]) - {""})
    out: dict[str, dict[str, float]] = {}
    for name, va in (("pbmc10k, held-out 20% (same run)", np.flatnonzero(~train)),
                     ("pbmc5k (another 10x run)", np.arange(adata.n_obs, counts.shape[0]))):
        for variant, (mis_val, mis_ref) in misfits(proportions, library, tr, va, l1[tr], types).items():
            out.setdefault(variant, {})[name] = round(float((mis_val > np.quantile(mis_ref, 1 - RATE)).mean()), 4)
    print(f"[another run] {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="pbmc10k,liao,another-run")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "out" / "rejection_expression")
    parser.add_argument("--embedding-only", action="store_true",
                        help="score only the embedding-side candidates (no expression misfits)")
    parser.add_argument("--pipeline", default=None,
                        help="comma-separated level-1 types: instead, score the Mahalanobis fit in atlases the "
                             "pipeline builds without each (run_pipeline)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the --pipeline builds")
    parser.add_argument("--ensemble-seeds", default=None,
                        help="comma-separated seeds: instead, score deep-ensemble candidates (run_ensemble)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ensemble_seeds:
        seeds = [int(x) for x in args.ensemble_seeds.split(",")]
        found = {}
        for task in (t for t in args.tasks.split(",") if t != "another-run"):
            found.update(run_ensemble(task, seeds))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ensemble.json").write_text(json.dumps(found, indent=2))
        names = list(next(iter(found.values()))["scores"])
        lines = ["| score | " + " | ".join(found) + " | mean AUROC |", "|---|" + "---:|" * (len(found) + 1)]
        for n in names:
            aurocs = [r["scores"][n]["auroc"] for r in found.values()]
            lines.append(f"| {n} | " + " | ".join(f"{a:.3f}" for a in aurocs) + f" | {np.mean(aurocs):.3f} |")
        for which in ("first member", "joined embeddings"):
            lines.append(f"| known-cell accuracy, {which} | "
                         + " | ".join(f"{r['known_accuracy'][which]:.3f}" for r in found.values()) + " | |")
        (args.out / "ensemble.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    if args.pipeline:
        args.out.mkdir(parents=True, exist_ok=True)
        found = run_pipeline(args.pipeline.split(","), args.workers)
        (args.out / f"pipeline_w{args.workers}.json").write_text(json.dumps(found, indent=2))
        return
    tasks = args.tasks.split(",")
    results = {}
    for task in tasks:
        if task != "another-run":
            results.update(run(task, args.embedding_only))
    shift = another_run() if "another-run" in tasks else {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"left_out": results, "another_run": shift}, indent=2))
    lines = []
    if shift:
        runs = list(next(iter(shift.values())))
        lines += ["Known cells rejected at a 5% reference-calibrated threshold (misfit alone)", "",
                  "| misfit | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
        lines += [f"| {v} | " + " | ".join(f"{r[k]:.3f}" for k in runs) + " |" for v, r in shift.items()]
        lines.append("")
    if not results:
        (args.out / "results.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    names = list(next(iter(results.values()))["scores"])
    lines += ["AUROC; known cells rejected / unseen cells caught at a 5% reference-calibrated threshold", "",
             "| score | " + " | ".join(results) + " | mean AUROC |", "|---|" + "---:|" * (len(results) + 1)]
    for n in names:
        cells = [results[k]["scores"][n] for k in results]
        lines.append(f"| {n} | " + " | ".join(
            f"{c['auroc']:.3f}; {c['known_rejected']:.2f} / {c['unseen_caught']:.2f}" for c in cells)
            + f" | {np.mean([c['auroc'] for c in cells]):.3f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
