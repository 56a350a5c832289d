"""Label heads: class weights, a loss that ignores unlabelled cells, probabilities without torch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from atlas.mapping.heads import head_probabilities
from atlas.models.concerto import embedding_head_weights
from atlas.models.config import ConcertoConfig, build_model
from atlas.models.heads import LabelHeads, class_weights


@settings(max_examples=60, deadline=None)
@given(counts=hnp.arrays(np.int64, st.integers(0, 12), elements=st.integers(0, 10**6)),
       power=st.sampled_from([0.0, 0.5, 1.0]))
def test_class_weights_keep_the_loss_scale_and_skip_empty_classes(counts, power):
    w = class_weights(counts, power)
    assert w.shape == counts.shape and w.dtype == np.float32 and np.all(np.isfinite(w)) and np.all(w >= 0)
    assert np.all(w[counts == 0] == 0)
    have = counts > 0
    if have.any():
        # The cell-weighted mean weight is 1: the loss keeps its scale whatever the imbalance.
        assert np.isclose((w[have] * counts[have]).sum() / counts[have].sum(), 1.0, rtol=1e-4)
        if power == 0:
            np.testing.assert_allclose(w[have], 1.0, rtol=1e-5)
        if power == 1:  # balanced: every class carries the same total weight
            totals = w[have] * counts[have]
            np.testing.assert_allclose(totals, totals[0], rtol=1e-4)
        rare, common = np.argmin(np.where(have, counts, np.inf)), np.argmax(counts)
        assert w[rare] >= w[common] - 1e-6


def test_unlabelled_cells_add_nothing_and_an_unlabelled_batch_gives_zero():
    torch.manual_seed(0)
    heads = LabelHeads(8, (3, 5))
    z = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([[0, 1], [2, 4], [1, -1], [-1, -1], [0, 3], [2, 0]])
    loss, labelled = heads.loss(z, labels)
    assert int(labelled) == 9  # 5 at level 1, 4 at level 2
    # Removing the unlabelled row changes nothing; the half-labelled row only counts at level 1.
    keep = torch.tensor([0, 1, 2, 4, 5])
    again, _ = heads.loss(z[keep], labels[keep])
    assert torch.isclose(loss, again)
    manual = sum(torch.nn.functional.cross_entropy(logits[labels[:, i] >= 0], labels[labels[:, i] >= 0, i])
                 for i, logits in enumerate(heads.logits(z)))
    assert torch.isclose(loss, manual)  # class weights 1: the plain mean cross-entropy per level
    nothing, count = heads.loss(z, torch.full((6, 2), -1))
    assert float(nothing) == 0.0 and int(count) == 0
    nothing.backward()  # every head is in the graph: data-parallel gradients stay in step
    assert all(p.grad is not None for p in heads.parameters())


def test_class_weights_change_the_loss_as_declared():
    torch.manual_seed(0)
    heads = LabelHeads(4, (2,))
    z = torch.randn(5, 4)
    labels = torch.tensor([[0], [0], [0], [1], [-1]])
    heads.class_weight(0).copy_(torch.tensor([0.5, 2.0]))
    loss, _ = heads.loss(z, labels)
    per_cell = torch.nn.functional.cross_entropy(heads.logits(z)[0][:4], labels[:4, 0], reduction="none")
    w = torch.tensor([0.5, 0.5, 0.5, 2.0])
    assert torch.isclose(loss, (w * per_cell).sum() / w.sum())


def test_concerto_trains_heads_only_when_it_has_labels_and_numpy_probabilities_match():
    import scipy.sparse as sp

    from atlas.data.batches import csr_to_batch

    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(1.0, (32, 20)).astype(np.float32))
    batch = csr_to_batch({"RNA": counts}, domain=np.zeros(32))
    model = build_model(ConcertoConfig(embed_dim=16), {"RNA": 20}, 1, (3,))
    plain = model(batch)
    assert "head_loss" not in plain  # no labels in the batch: the contrastive loss alone
    labelled = model({**batch, "labels": torch.from_numpy(rng.integers(-1, 3, (32, 1)))})
    assert float(labelled["loss"]) > float(labelled["contrastive"]) and float(labelled["head_loss"]) > 0
    assert model.student_heads is not None  # the default embedding: each network has its heads
    for m in (model, *(build_model(ConcertoConfig(embed_dim=16, embedding=e), {"RNA": 20}, 1, (3,))
                       for e in ("teacher", "normalised-teacher"))):
        emb = m.embed(batch)
        torch_p = m.head_probabilities(emb)[0].numpy()
        weights = embedding_head_weights(m.config, m.state_dict(), 1)
        assert weights[0][0].shape == (3, m.embedding_dim)
        numpy_p = head_probabilities(emb.numpy(), weights)[0]
        np.testing.assert_allclose(numpy_p, torch_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(numpy_p.sum(1), 1.0, rtol=1e-5)
    assert build_model(ConcertoConfig(embed_dim=16), {"RNA": 20}, 1).heads is None


def test_head_weight_zero_is_the_contrastive_loss():
    import scipy.sparse as sp

    from atlas.data.batches import csr_to_batch

    counts = sp.csr_matrix(np.random.default_rng(1).poisson(1.0, (16, 10)).astype(np.float32))
    batch = csr_to_batch({"RNA": counts}, domain=np.zeros(16))
    model = build_model(ConcertoConfig(embed_dim=8, head_weight=0.0, dropout=0.0), {"RNA": 10}, 1, (2,))
    out = model({**batch, "labels": torch.zeros(16, 1, dtype=torch.long)})
    assert float(out["loss"]) == pytest.approx(float(out["contrastive"]))


def test_a_level_without_labelled_cells_trains_and_scales_nothing():
    from atlas.mapping.heads import Heads

    heads = LabelHeads(4, (0, 2))
    z = torch.randn(3, 4)
    loss, count = heads.loss(z, torch.tensor([[-1, 0], [-1, 1], [-1, -1]]))
    assert torch.isfinite(loss) and int(count) == 2
    mapped = Heads(("a", "b"), ((), ("x", "y")), ((np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
                                                  (np.zeros((2, 4), np.float32), np.zeros(2, np.float32))))
    assert list(mapped.probabilities(np.ones((3, 4), np.float32))) == ["b"]
