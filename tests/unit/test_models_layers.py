"""Shared layers: masked attention pooling, sparse dense layer, domain-specific BN, VQ-EMA."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas.models.layers import (
    DomainBatchNorm1d,
    MaskedAttentionPool,
    SparseLinear,
    VectorQuantizerEMA,
)

torch.set_num_threads(1)


def test_masked_attention_padding_invariance():
    torch.manual_seed(0)
    pool = MaskedAttentionPool(8)
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    pooled, w = pool(h, mask)
    # More padding with garbage in it changes nothing.
    h_pad = torch.cat([h, 100 * torch.randn(3, 4, 8)], 1)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    pooled2, w2 = pool(h_pad, mask_pad)
    torch.testing.assert_close(pooled, pooled2)
    torch.testing.assert_close(w, w2[:, :5])
    assert torch.all(w2[:, 5:] == 0) and torch.all(w[~mask] == 0)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    # The first cell alone (no padding at all) gives the same result.
    alone, _ = pool(h[:1, :3], mask[:1, :3])
    torch.testing.assert_close(alone, pooled[:1])
    # A cell with no features pools to zero, without NaN.
    empty, w_empty = pool(h[:1], torch.zeros(1, 5, dtype=torch.bool))
    assert torch.all(empty == 0) and torch.all(w_empty == 0)


def test_sparse_linear_equals_dense_linear():
    torch.manual_seed(0)
    n_features, out = 20, 6
    layer = SparseLinear(n_features, out)
    with torch.no_grad():
        layer.bias.normal_()
    ids = torch.tensor([[3, 7, 19, 0], [0, 1, 2, 5]])
    values = torch.tensor([[1.5, 0.2, 3.0, 0.0], [0.7, 0.1, 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    dense = torch.zeros(2, n_features).scatter_add_(1, ids, values * mask)
    expected = F.linear(dense, layer.weight.t(), layer.bias)
    torch.testing.assert_close(layer(ids, values, mask), expected)
    # Gradients agree with the dense layer too.
    y = layer(ids, values, mask).pow(2).sum()
    y.backward()
    w = layer.weight.detach().clone().requires_grad_()
    F.linear(dense, w.t(), layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)


def test_dsbn_uses_only_its_domains_statistics():
    torch.manual_seed(0)
    bn = DomainBatchNorm1d(4, n_domains=3, momentum=1.0)
    x0 = torch.randn(6, 4) * 5 + 10
    x1 = torch.randn(5, 4) * 0.1 - 3
    x = torch.cat([x0, x1])
    domain = torch.tensor([0] * 6 + [1] * 5)
    y = bn(x, domain)

    def norm(a):
        return (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + bn.eps)

    torch.testing.assert_close(y[:6], norm(x0))
    torch.testing.assert_close(y[6:], norm(x1))
    # Changing domain 1's cells leaves domain 0's output unchanged.
    y2 = bn(torch.cat([x0, x1 * 50 + 7]), domain)
    torch.testing.assert_close(y2[:6], y[:6])
    # A single-domain minibatch works and updates only that domain's running statistics.
    before = bn.running_mean.clone()
    bn(x1, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(bn.running_mean[0], before[0])
    assert bn.domain_batches.tolist() == [2, 3, 0]
    # Eval: per-domain running statistics; an unseen domain (-1) and a never-trained one (2)
    # use the average of the seen domains' statistics.
    bn.eval()
    out = bn(torch.cat([x0[:1], x1[:1], x0[:1], x0[:1]]), torch.tensor([0, 1, -1, 2]))
    mean_u = bn.running_mean[:2].mean(0)
    var_u = bn.running_var[:2].mean(0)
    torch.testing.assert_close(out[2], (x0[0] - mean_u) / torch.sqrt(var_u + bn.eps))
    torch.testing.assert_close(out[2], out[3])
    torch.testing.assert_close(
        out[0], (x0[0] - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps)
    )


def _vq(**kw):
    vq = VectorQuantizerEMA(n_codes=3, dim=2, **kw)
    with torch.no_grad():
        vq.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        vq.embed_sum.copy_(vq.embedding)
        vq.cluster_size.fill_(1.0)
        vq.initialized.fill_(True)
    return vq


def test_vq_selects_nearest_code():
    vq = _vq().eval()
    z = torch.tensor([[0.1, -0.1], [0.9, 0.2], [0.2, 0.7], [0.6, 0.55]])
    out = vq(z)
    assert out["codes"].tolist() == [0, 1, 2, 1]
    torch.testing.assert_close(out["quantized"], vq.embedding[out["codes"]])


def test_vq_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 2)
    vq = _vq().eval()
    out = vq(encoder(torch.randn(5, 3)))
    (out["quantized"].sum() + out["commitment"]).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0


def test_vq_ema_update_matches_formula():
    decay, eps = 0.9, 1e-5
    vq = _vq(decay=decay, eps=eps, dead_threshold=0.0).train()
    z = torch.tensor([[0.1, 0.0], [0.2, 0.1], [0.9, 0.1]])  # codes 0, 0, 1; code 2 unused
    vq(z)
    counts = torch.tensor([2.0, 1.0, 0.0])
    sums = torch.tensor([[0.3, 0.1], [0.9, 0.1], [0.0, 0.0]])
    n_k = decay * torch.ones(3) + (1 - decay) * counts
    m_k = decay * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) + (1 - decay) * sums
    n = n_k.sum()
    smoothed = (n_k + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(vq.cluster_size, n_k)
    torch.testing.assert_close(vq.embed_sum, m_k)
    torch.testing.assert_close(vq.embedding, m_k / smoothed[:, None])


def test_vq_dead_codes_are_reseeded_from_recent_outputs():
    torch.manual_seed(0)
    vq = _vq(decay=0.5, dead_threshold=0.2).train()
    z = torch.tensor([[5.0, 5.0], [5.1, 5.0], [4.9, 5.2], [5.0, 4.8]])
    for _ in range(4):
        vq(z)  # everything lands on code 1 or 2; code 0 starves
    assert int(vq.n_reseeded) > 0
    # Every code now sits on a recent encoder output or on the data's cluster: none far away.
    dist_to_data = torch.cdist(vq.embedding, z).min(1).values
    assert float(dist_to_data.max()) < 1.0


def test_vq_initialises_codebook_from_data_and_reports_perplexity():
    torch.manual_seed(0)
    vq = VectorQuantizerEMA(16, 4).train()
    z = torch.randn(64, 4) * 3 + 10
    out = vq(z)
    assert bool(vq.initialized)
    assert float(torch.cdist(vq.embedding, z).min(1).values.max()) < 1.0
    assert 1.0 < float(out["perplexity"]) <= 16.0 and 0 < float(out["usage"]) <= 1


def test_score_table_matches_exact_scores_and_falls_back_outside_its_range():
    """Inference on the CPU interpolates each entry's attention score from a per-feature table;
    the pooled vectors and weights stay within interpolation error of the exact path, entries whose
    scale lies outside the table are scored exactly, and changed weights rebuild the table."""
    from atlas.models.layers import SCORE_RANGE, MaskedAttentionPool

    torch.manual_seed(0)
    pool = MaskedAttentionPool(16)
    table = torch.randn(50, 16) * 0.3
    ids = torch.randint(0, 50, (400,))
    row = torch.sort(torch.randint(0, 30, (400,))).values
    scale = torch.randn(400) * 3

    def run(use_table: bool, s: torch.Tensor = scale):
        pool.score_table = use_table
        with torch.no_grad():
            return pool.pool_scaled_rows(table, ids, s, row, 30, chunk=64)

    (exact_pooled, exact_w), (pooled, w) = run(False), run(True)
    torch.testing.assert_close(pooled, exact_pooled, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(w, exact_w, atol=1e-4, rtol=1e-3)
    assert not torch.equal(w, exact_w)  # the table was used
    outside = torch.where(scale > 0, SCORE_RANGE + 1 + scale, -SCORE_RANGE - 1 + scale)
    (exact_outside, ew), (table_outside, tw) = run(False, outside), run(True, outside)
    torch.testing.assert_close(tw, ew, atol=1e-7, rtol=1e-6)  # every entry scored exactly
    torch.testing.assert_close(table_outside, exact_outside, atol=1e-6, rtol=1e-5)
    odd = scale.clone()
    odd[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    (_, ew), (_, tw) = run(False, odd), run(True, odd)  # not an index error: scored exactly, as before
    torch.testing.assert_close(tw, ew, atol=1e-4, rtol=1e-3, equal_nan=True)
    with torch.no_grad():
        pool.context.mul_(-2.0)  # an in-place update (an optimiser step, load_state_dict)
    (exact_pooled, exact_w), (pooled, w) = run(False), run(True)
    torch.testing.assert_close(w, exact_w, atol=2e-4, rtol=2e-3)
    pool.score_table = True
    with torch.enable_grad():  # training scores exactly, with gradients
        _, tw = pool.pool_scaled_rows(table, ids, scale, row, 30, chunk=64)
    torch.testing.assert_close(tw.detach(), exact_w, atol=1e-7, rtol=1e-6)


def test_score_table_is_shared_by_copies_of_the_same_weights(monkeypatch):
    """A deep copy (the copy that holds a query's own normalisation statistics) and a model loaded
    again reuse the table built for the same weights instead of rebuilding it (seconds on one
    thread for a whole-genome vocabulary); different weights never share one."""
    import copy

    from atlas.models import layers
    from atlas.models.layers import MaskedAttentionPool

    monkeypatch.setattr(layers, "_SCORE_TABLES", layers.ContentCache(size=2))
    built = []
    real_build = MaskedAttentionPool._build_score_table

    def counting(self, table):
        built.append(1)
        return real_build(self, table)

    monkeypatch.setattr(MaskedAttentionPool, "_build_score_table", counting)
    torch.manual_seed(0)
    pool, table = MaskedAttentionPool(8), torch.randn(20, 8)
    first = pool._score_table(table)
    assert pool._score_table(table) is first and len(built) == 1  # same weights, same tensors

    twin = copy.deepcopy(pool)
    assert twin._score_table(table.clone()) is first and len(built) == 1
    loaded = MaskedAttentionPool(8)
    loaded.load_state_dict(pool.state_dict())
    assert loaded._score_table(table.clone()) is first and len(built) == 1

    with torch.no_grad():
        twin.proj.bias.add_(0.5)  # other weights: its own table, and the original keeps its own
    changed = twin._score_table(table)
    assert len(built) == 2 and not torch.equal(changed, first)
    torch.testing.assert_close(changed, real_build(twin, table))
    assert pool._score_table(table) is first
    other_genes = table.clone()
    other_genes[0] += 1
    assert not torch.equal(pool._score_table(other_genes), first) and len(built) == 3
    assert len(layers._SCORE_TABLES._tables) == 2  # bounded


@given(st.integers(0, 3), st.integers(1, 6))
@settings(max_examples=20, deadline=None)
def test_content_cache_fingerprint_tells_shapes_and_values_apart(rows, cols):
    from atlas.models.layers import ContentCache

    a = torch.zeros(rows, cols)
    assert ContentCache.fingerprint((a,)) == ContentCache.fingerprint((a.clone(),))
    assert ContentCache.fingerprint((a,)) != ContentCache.fingerprint((torch.zeros(rows + 1, cols),))
    assert ContentCache.fingerprint((a,)) != ContentCache.fingerprint((a.double(),))
    if rows:
        b = a.clone()
        b[-1, -1] = 1e-30
        assert ContentCache.fingerprint((a,)) != ContentCache.fingerprint((b,))
