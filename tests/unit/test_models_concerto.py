"""Concerto: NT-Xent, student/teacher behaviour, multimodal sum, embedding, config round trip."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from atlas.data.batches import csr_to_batch
from atlas.models import ConcertoConfig, build_model, config_from_dict, config_to_dict, nt_xent
from atlas.models.concerto import ConcertoStudent


@pytest.fixture(autouse=True)
def exact_scores(monkeypatch):
    """These tests check formulas against the training path: inference scores exactly here
    (the score table's interpolation is tested on its own in test_models_layers)."""
    from atlas.models.layers import MaskedAttentionPool

    monkeypatch.setattr(MaskedAttentionPool, "score_table", False)

torch.set_num_threads(1)


def nt_xent_reference(t, s, tau):
    """The formula written out: for anchor i among the 2N views, positive p(i),
    l_i = -log exp(sim(i, p)/τ) / Σ_{k≠i} exp(sim(i, k)/τ); loss = mean over 2N."""
    views = torch.cat([F.normalize(t, dim=1), F.normalize(s, dim=1)])
    n = t.shape[0]
    total = 0.0
    for i in range(2 * n):
        p = i + n if i < n else i - n
        sims = [float(views[i] @ views[k]) / tau for k in range(2 * n)]
        denom = sum(np.exp(sims[k]) for k in range(2 * n) if k != i)
        total += -np.log(np.exp(sims[p]) / denom)
    return total / (2 * n)


def test_nt_xent_matches_direct_formula():
    torch.manual_seed(0)
    t, s = torch.randn(7, 5), torch.randn(7, 5)
    got = float(nt_xent(t, s, temperature=0.1))
    assert abs(got - nt_xent_reference(t, s, 0.1)) < 1e-4
    # Symmetric in its two views.
    assert abs(float(nt_xent(s, t, 0.1)) - got) < 1e-5
    # Scale-invariant (cosine on L2-normalised outputs).
    assert abs(float(nt_xent(3 * t, 0.5 * s, 0.1)) - got) < 1e-4


def test_student_equals_dense_linear_then_bn_relu():
    torch.manual_seed(0)
    student = ConcertoStudent(n_features=30, dim=8, dropout=0.0, n_domains=1).eval()
    counts = sp.random(5, 30, density=0.3, format="csr", random_state=0) * 10
    batch = csr_to_batch({"RNA": counts})
    dense = torch.zeros(5, 30).scatter_add_(1, batch["RNA_ids"], batch["RNA_values"] * batch["RNA_mask"])
    lin = F.linear(dense, student.input.weight.t(), student.input.bias)
    bn = student.norms[0]
    expected = F.relu((lin - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps) * bn.weight + bn.bias)
    got = student(batch["RNA_ids"], batch["RNA_values"], batch["RNA_mask"], batch["domain"])
    torch.testing.assert_close(got, expected)


def _batch(n=12, seed=0):
    rng = np.random.default_rng(seed)
    rna = sp.random(n, 40, density=0.3, format="csr", random_state=seed) * 20
    prot = sp.csr_matrix(rng.poisson(5, size=(n, 6)).astype(np.float32))
    return csr_to_batch({"RNA": rna, "protein": prot}, domain=np.arange(n) % 2)


def test_multimodal_sum_and_missing_modality():
    torch.manual_seed(0)
    model = build_model(ConcertoConfig(modalities=("RNA", "protein"), embedding="teacher"), {"RNA": 40, "protein": 6}, 2)
    batch = _batch()
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    full = model.embed(batch)
    # RNA-only view of the same cells: the protein term is omitted, equal to the RNA teacher.
    rna_only = {k: v for k, v in batch.items() if not k.startswith("protein")}
    z_rna = model.embed(rna_only)
    expected, _ = model.teachers["RNA"].eval()(batch["RNA_ids"], batch["RNA_values"], batch["RNA_mask"], batch["domain"])
    torch.testing.assert_close(z_rna, expected)
    # An all-False protein mask row means "no protein" for that cell.
    half = dict(batch)
    half["protein_mask"] = batch["protein_mask"].clone()
    half["protein_mask"][:3] = False
    z_half = model.embed(half)
    torch.testing.assert_close(z_half[:3], z_rna[:3])
    torch.testing.assert_close(z_half[3:], full[3:])


def test_teacher_plus_student_embedding_is_both_normalised_views_concatenated():
    torch.manual_seed(0)
    config = ConcertoConfig(modalities=("RNA", "protein"), embed_dim=16)
    assert config.embedding == "teacher+student"  # the validated default
    model = build_model(config, {"RNA": 40, "protein": 6}, 2, n_classes=(3,))
    batch = _batch()
    model.train()
    model(batch)  # running statistics
    z = model.embed(batch)
    assert z.shape == (12, 32) and model.embedding_dim == 32
    model.eval()
    t = sum(model.teachers[m](batch[f"{m}_ids"], batch[f"{m}_values"], batch[f"{m}_mask"], batch["domain"])[0]
            for m in ("RNA", "protein"))
    s = sum(model.students[m](batch[f"{m}_ids"], batch[f"{m}_values"], batch[f"{m}_mask"], batch["domain"])
            for m in ("RNA", "protein"))
    torch.testing.assert_close(z, torch.cat([F.normalize(t, dim=1), F.normalize(s, dim=1)], 1))
    # Each network has its heads (over its half); a cell without any modality embeds as zeros.
    assert model.heads.linears[0].in_features == 16 and model.student_heads.linears[0].in_features == 16
    empty = dict(batch, RNA_mask=torch.zeros_like(batch["RNA_mask"]), protein_mask=torch.zeros_like(batch["protein_mask"]))
    assert not model.embed(empty).any()


def test_manifest_without_embedding_option_reads_as_teacher_only():
    """Atlases written before the option trained their heads on the teacher alone."""
    from atlas.models.config import model_from_spec

    config = config_to_dict(ConcertoConfig())
    del config["embedding"]
    old = model_from_spec({"config": config, "vocab_sizes": {"RNA": 40}, "n_domains": 2,
                           "heads": {"classes": [["a", "b"]]}})
    assert old.config.embedding == "teacher" and old.embedding_dim == 128
    assert old.heads.linears[0].in_features == 128 and old.student_heads is None
    # A build config without the key gets the default.
    assert config_from_dict({"model": "concerto"}).embedding == "teacher+student"


def test_normalised_teacher_embedding_is_the_unit_teacher_with_cosine_heads():
    torch.manual_seed(0)
    model = build_model(ConcertoConfig(modalities=("protein",), embed_dim=16, embedding="normalised-teacher"),
                        {"protein": 6}, 2, n_classes=(3,))
    batch = {k: v for k, v in _batch().items() if not k.startswith("RNA")}
    model.train()
    out = model({**batch, "labels": torch.tensor([[0], [1], [2], [-1]] * 3)})
    assert float(out["head_loss"]) > 0 and model.student_heads is None
    z = model.embed(batch)
    assert z.shape == (12, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(12))
    model.eval()
    t = model.teachers["protein"](batch["protein_ids"], batch["protein_values"], batch["protein_mask"], batch["domain"])[0]
    torch.testing.assert_close(z, F.normalize(t, dim=1))


def test_embed_is_deterministic_and_padding_free():
    torch.manual_seed(0)
    model = build_model(ConcertoConfig(), {"RNA": 40}, 2)
    batch = _batch()
    model.train()
    model(batch)  # populate running statistics
    a, b = model.embed(batch), model.embed(batch)
    torch.testing.assert_close(a, b)
    assert model.training  # embed restores the mode
    # Embedding one cell alone (less padding, no batch-mates) gives the same vector.
    one = {k: v[:1] for k, v in batch.items()}
    width = int(one["RNA_mask"].sum())
    for key in ("RNA_ids", "RNA_values", "RNA_mask"):
        one[key] = one[key][:, :width]
    torch.testing.assert_close(model.embed(one), a[:1])
    # Unseen domain is accepted at inference.
    unseen = dict(batch, domain=torch.full_like(batch["domain"], -1))
    assert torch.isfinite(model.embed(unseen)).all()
    ids, w = model.attention(batch)
    assert ids.shape == w.shape
    torch.testing.assert_close(w.sum(1), torch.ones(w.shape[0]))


def test_config_round_trip_through_json():
    cfg = ConcertoConfig(modalities=("RNA", "protein"), embed_dim=64)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert again == cfg


def test_teacher_attention_matches_formula_and_contribution_share():
    """Teacher pooling written out for one cell: v = BN(value), h_i = e_i·v_i,
    a = softmax_i(u·tanh(W h_i + b)) over the cell's measured features only, pooled = Σ a_i h_i;
    contribution_i = a_i‖h_i‖ / Σ_j a_j‖h_j‖. Pins that the pooled vector uses h (not e) and that
    the attention/contribution ``kind``s of ``Concerto.attention`` agree with the formula."""
    torch.manual_seed(0)
    model = build_model(ConcertoConfig(modalities=("protein",), embed_dim=16), {"protein": 6}, 2)
    batch = _batch()
    model.train()
    model(batch)  # non-trivial running statistics for the value BN
    model.eval()  # running statistics in the value BN for the direct computation below
    teacher = model.teachers["protein"]
    with torch.no_grad():
        for _ in range(3):  # move the attention off its initialisation
            for p in teacher.pool.parameters():
                p.add_(0.5 * torch.randn_like(p))
    ids, weights = model.attention(batch, "protein")
    _, contrib = model.attention(batch, "protein", kind="contribution")
    bn = teacher.value_norm
    for c in range(batch["domain"].shape[0]):
        m = batch["protein_mask"][c]
        v = batch["protein_values"][c][m]
        mean, var = bn._eval_statistics(batch["domain"][c : c + 1])  # the value BN is per domain
        v = (v - mean[0, 0]) / torch.sqrt(var[0, 0] + bn.eps) * bn.weight + bn.bias
        h = teacher.embedding.weight[batch["protein_ids"][c][m]] * v[:, None]
        scores = torch.tanh(h @ teacher.pool.proj.weight.t() + teacher.pool.proj.bias) @ teacher.pool.context
        a = torch.softmax(scores, 0)
        torch.testing.assert_close(weights[c][m], a.detach(), atol=1e-6, rtol=1e-5)
        assert float(weights[c][~m].abs().sum()) == 0.0
        share = a * h.norm(dim=1)
        torch.testing.assert_close(contrib[c][m], (share / share.sum()).detach(), atol=1e-6, rtol=1e-5)
        assert float(contrib[c][~m].abs().sum()) == 0.0
        pooled, _, _, _ = teacher._pool(batch["protein_ids"][c : c + 1], batch["protein_values"][c : c + 1],
                                        batch["protein_mask"][c : c + 1], batch["domain"][c : c + 1])
        torch.testing.assert_close(pooled[0], (a[:, None] * h).sum(0).detach(), atol=1e-5, rtol=1e-5)
    try:
        model.attention(batch, "protein", kind="nonsense")
    except ValueError:
        pass
    else:
        raise AssertionError("unknown kind must be rejected")


def test_fused_pooling_equals_the_materialised_one_in_values_and_gradients(monkeypatch):
    """The teacher pools without materialising the [entries, D] products (training, embedding and
    mapping); its vectors, attention weights and every parameter's gradient equal those of the
    plain formula (``_pool``), for every chunking, a cell with no counts included."""
    import atlas.models.concerto as concerto

    counts = sp.random(30, 200, density=0.08, format="csr", random_state=3, dtype=np.float32)
    counts.data = np.ceil(counts.data * 20)
    counts = sp.vstack([counts, sp.csr_matrix((1, 200), dtype=np.float32)]).tocsr()  # a cell with no counts
    batch = csr_to_batch({"RNA": counts}, domain=np.r_[np.zeros(16), np.ones(15)].astype(np.int64))
    torch.manual_seed(0)
    model = build_model(ConcertoConfig(modalities=("RNA",), embed_dim=16), {"RNA": 200}, 2).eval()
    teacher = model.teachers["RNA"]
    args = (batch["RNA_ids"], batch["RNA_values"], batch["RNA_mask"], batch["domain"])
    probe = torch.randn(31, 16)

    def grads(pooled):
        teacher.zero_grad()
        (pooled * probe).sum().backward()
        return {k: p.grad.clone() for k, p in teacher.named_parameters() if p.grad is not None}

    want, _, want_w, (rows, cols) = teacher._pool(*args)
    want_grads = grads(want)
    for chunk in (5, 64, 100_000):
        monkeypatch.setattr(concerto, "FUSED_CHUNK", chunk)
        got, got_w, _ = teacher._pool_fused(*args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
        got_grads = grads(got)
        assert set(got_grads) == set(want_grads) == {n for n, _ in teacher.named_parameters()
                                                     if not n.startswith(("norm", "dense"))}
        for name, g in want_grads.items():
            # float32 sums in another order: equal to ~1e-6 of the gradient's scale
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)
        with torch.no_grad():
            out, weights = teacher(*args)
        assert out.shape == (31, 16) and weights[-1].sum() == 0  # the empty cell has no weights
