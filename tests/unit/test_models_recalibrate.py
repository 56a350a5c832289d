"""Exact per-domain normalisation statistics (atlas.models.recalibrate) and the per-domain value
normalisation of Concerto's teacher: the pieces of the ADTnorm multi-worker fix."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from atlas.data.batches import csr_to_batch
from atlas.models.concerto import ConcertoConfig
from atlas.models.config import build_model
from atlas.models.recalibrate import DomainStatistics


@pytest.fixture(autouse=True)
def exact_scores(monkeypatch):
    """These tests check formulas against the training path: inference scores exactly here
    (the score table's interpolation is tested on its own in test_models_layers)."""
    from atlas.models.layers import MaskedAttentionPool

    monkeypatch.setattr(MaskedAttentionPool, "score_table", False)


def _model_and_batch(n=40, domains=3, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(rng.poisson(rng.uniform(0.5, 6, size=(n, 7))).astype(np.float32))
    batch = csr_to_batch({"protein": counts}, domain=np.arange(n) % domains)
    model = build_model(ConcertoConfig(modalities=("protein",), embed_dim=8), {"protein": 7}, domains)
    model.train()
    for _ in range(3):  # moving averages that are not the exact statistics
        model(batch)
    return model.eval(), batch


def _teacher_inputs(model, batch):
    """The two normalisation layers' inputs, computed directly: values (per entry) and tanh(pooled)."""
    teacher = model.teachers["protein"]
    mask = batch["protein_mask"]
    rows, cols = mask.nonzero(as_tuple=True)
    values = batch["protein_values"][rows, cols].double()
    with torch.no_grad():
        pooled, _, _, _ = teacher._pool(batch["protein_ids"], batch["protein_values"], mask, batch["domain"])
    return values, batch["domain"][rows], torch.tanh(pooled).double(), batch["domain"]


def test_two_passes_give_the_exact_statistics_of_both_teacher_layers():
    model, batch = _model_and_batch()
    for _ in range(2):
        stats = DomainStatistics(model)
        with stats.recording():
            model.embed(batch)
        stats.apply()
    teacher = model.teachers["protein"]
    values, value_domain, pooled, domain = _teacher_inputs(model, batch)
    for d in range(3):
        v = values[value_domain == d]
        torch.testing.assert_close(teacher.value_norm.running_mean[d, 0].double(), v.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(teacher.value_norm.running_var[d, 0].double(), v.var(), rtol=1e-4, atol=1e-8)
        x = pooled[domain == d]
        torch.testing.assert_close(teacher.norm.running_mean[d].double(), x.mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(teacher.norm.running_var[d].double(), x.var(0), rtol=1e-4, atol=1e-9)


def test_recording_in_parts_and_summing_vectors_equals_one_recording():
    model, batch = _model_and_batch()
    whole = DomainStatistics(model)
    with whole.recording():
        model.embed(batch)
    parts = DomainStatistics(model)
    for rows in (slice(0, 13), slice(13, 40)):
        piece = DomainStatistics(model)
        with piece.recording():
            model.embed({k: v[rows] for k, v in batch.items()})
        parts.add_vector(piece.vector())
    np.testing.assert_allclose(parts.vector(), whole.vector(), rtol=1e-9, atol=1e-12)


def test_unseen_domains_and_domains_with_one_row_keep_their_statistics():
    model, batch = _model_and_batch()
    before = model.teachers["protein"].norm.running_mean.clone()
    one = {k: v[:1] for k, v in batch.items()}  # a single cell of domain 0: no variance
    one["domain"] = torch.tensor([0])
    stats = DomainStatistics(model)
    with stats.recording():
        model.embed({**batch, "domain": torch.full_like(batch["domain"], -1)})  # unseen: not recorded
        model.embed(one)
    stats.apply()
    torch.testing.assert_close(model.teachers["protein"].norm.running_mean, before)


def test_an_artifact_with_a_plain_value_batchnorm_still_loads():
    """Artifacts built before the value normalisation was per domain hold BatchNorm1d(1) state."""
    model, batch = _model_and_batch()
    state = model.state_dict()
    old = dict(state)
    for key in ("running_mean", "running_var"):
        old[f"teachers.protein.value_norm.{key}"] = torch.tensor([2.0 if key == "running_mean" else 3.0])
    del old["teachers.protein.value_norm.domain_batches"]
    old["teachers.protein.value_norm.num_batches_tracked"] = torch.tensor(5)
    fresh = build_model(ConcertoConfig(modalities=("protein",), embed_dim=8), {"protein": 7}, 3)
    fresh.load_state_dict(old)
    vn = fresh.teachers["protein"].value_norm
    assert torch.equal(vn.running_mean, torch.full((3, 1), 2.0)) and torch.equal(vn.running_var, torch.full((3, 1), 3.0))
    assert bool((vn.domain_batches > 0).all())
    assert torch.isfinite(fresh.embed(batch)).all()
