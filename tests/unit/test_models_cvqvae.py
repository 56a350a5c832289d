"""CVQVAE: both decoders trained, cross-decoding, embeddings, views, ablation switch."""

import json

import numpy as np
import scipy.sparse as sp
import torch

from atlas.data.batches import csr_to_batch
from atlas.models import CVQVAEConfig, build_model, config_from_dict, config_to_dict
from atlas.models.views import LSIView, PCAView, lognorm_counts

torch.set_num_threads(1)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    rna = sp.csr_matrix(rng.poisson(1.0, size=(n, 30)).astype(np.float32))
    atac = sp.csr_matrix((rng.random((n, 50)) < 0.2).astype(np.float32))
    return rna, atac


def _model(**kw):
    rna, atac = _data()
    cfg = CVQVAEConfig(view_components=8, hidden=(16, 8), latent_dim=4, codebook_size=16, **kw)
    model = build_model(cfg, {"RNA": 30, "ATAC": 50}, n_domains=1)
    model.fit_views({"RNA": rna, "ATAC": atac})
    return model, csr_to_batch({"RNA": rna, "ATAC": atac})


def test_both_decoders_receive_gradients():
    torch.manual_seed(0)
    model, batch = _model()
    out = model(batch)
    out["loss"].backward()
    for m in ("RNA", "ATAC"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoders[m].parameters())
        assert all(p.grad is not None for p in model.encoders[m].parameters())
    assert out["perplexity_1"] > 1 and out["perplexity_2"] > 1


def test_cross_decoding_direction():
    """D_ATAC reconstructs ATAC from the RNA latent: changing ATAC input moves recon_2to1 only."""
    torch.manual_seed(0)
    model, batch = _model(quantize=False)
    model.eval()
    base = model(batch)
    changed = dict(batch)
    changed["ATAC_values"] = batch["ATAC_values"].flip(0)
    changed["ATAC_ids"] = batch["ATAC_ids"].flip(0)
    changed["ATAC_mask"] = batch["ATAC_mask"].flip(0)
    out = model(changed)
    # RNA → D_ATAC target changes; ATAC → D_RNA prediction changes; check both terms move.
    assert not torch.isclose(out["recon_1to2"], base["recon_1to2"])
    pred = model.predict_other(batch, "RNA")
    assert pred["view"].shape == (64, 8) and pred["features"].shape == (64, 50)
    pred2 = model.predict_other(batch, "ATAC")
    assert pred2["features"].shape == (64, 30) and bool((pred2["features"] >= 0).all())


def test_embed_mean_of_views_and_single_view():
    torch.manual_seed(0)
    model, batch = _model()
    model(batch)
    z = model.embed(batch)
    model.eval()
    z1 = model.encode(batch, "RNA")
    z2 = model.encode(batch, "ATAC")
    torch.testing.assert_close(z, (z1 + z2) / 2)
    rna_only = {k: v for k, v in batch.items() if not k.startswith("ATAC")}
    torch.testing.assert_close(model.embed(rna_only), z1)


def test_views_project_sparsely_like_dense_pca_and_invert():
    rna, atac = _data()
    pca = PCAView(30, 8).fit(rna)
    batch = csr_to_batch({"RNA": rna, "ATAC": atac})
    coords = pca(batch["RNA_ids"], batch["RNA_values"], batch["RNA_mask"])
    x = torch.from_numpy(lognorm_counts(rna).toarray())
    dense = (x - pca.mean) @ pca.components.t() / pca.scale
    torch.testing.assert_close(coords, dense, atol=1e-4, rtol=1e-4)
    # Components are orthonormal; the inverse is the PCA reconstruction.
    torch.testing.assert_close(pca.components @ pca.components.t(), torch.eye(8), atol=1e-4, rtol=0)
    lsi = LSIView(50, 8).fit(atac)
    assert lsi(batch["ATAC_ids"], batch["ATAC_values"], batch["ATAC_mask"]).shape == (64, 8)
    assert lsi.inverse(torch.zeros(2, 8)).shape == (2, 50)


def test_lsi_inverse_is_the_least_squares_map_around_the_mean_profile():
    rna, atac = _data(n=200)
    lsi = LSIView(50, 8).fit(atac)
    batch = csr_to_batch({"ATAC": atac})
    coords = lsi(batch["ATAC_ids"], batch["ATAC_values"], batch["ATAC_mask"])
    measured = torch.from_numpy(lognorm_counts(atac).toarray()).float()
    # The mean coordinates map to the mean profile (clipped at 0, which a mean never needs).
    torch.testing.assert_close(lsi.inverse(coords.mean(0, keepdim=True))[0], measured.mean(0), atol=1e-4, rtol=1e-4)
    # Least squares over the fitted cells: no other linear map from the coordinates does better,
    # so in particular the mean profile (the zero map) does not.
    fitted = lsi.inverse(coords)
    assert ((fitted - measured) ** 2).sum() < ((measured.mean(0) - measured) ** 2).sum()
    # A view saved before the map existed loads and keeps the TF-IDF inverse.
    old = {k: v for k, v in lsi.state_dict().items()
           if k not in ("inverse_weights", "profile_mean", "coord_mean", "least_squares")}
    restored = LSIView(50, 8)
    restored.load_state_dict(old)
    assert not bool(restored.least_squares)
    t = ((coords[:3] * restored.scale) @ restored.components).clamp_min(0.0)
    torch.testing.assert_close(restored.inverse(coords[:3]), torch.log1p(torch.expm1(t) / restored.idf))


def test_ablation_switch_and_config_round_trip():
    model, batch = _model(quantize=False)
    assert len(model.quantizers) == 0
    assert torch.isfinite(model(batch)["loss"])
    cfg = CVQVAEConfig(lambdas=(1.0, 2.0, 5.0), quantize=False)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_learned_input_view():
    torch.manual_seed(0)
    model, batch = _model(input_view="learned")
    out = model(batch)
    out["loss"].backward()
    assert model.views["RNA"].input.weight.grad is not None
    assert model.predict_other(batch, "RNA")["features"].shape == (64, 50)


def _two_domain_model(domain_norm, **kw):
    rna, atac = _data()
    cfg = CVQVAEConfig(view_components=8, hidden=(16, 8), latent_dim=4, codebook_size=16,
                       domain_norm=domain_norm, **kw)
    model = build_model(cfg, {"RNA": 30, "ATAC": 50}, n_domains=2)
    model.fit_views({"RNA": rna, "ATAC": atac})
    domain = np.repeat([0, 1], 32)
    return model, csr_to_batch({"RNA": rna, "ATAC": atac}, domain=domain)


def test_domain_norm_places_per_domain_statistics_where_asked():
    from atlas.models.layers import DomainBatchNorm1d

    for where, encoders, decoders in (("none", False, False), ("encoders", True, False), ("all", True, True)):
        model, _ = _two_domain_model(where)
        for m in ("RNA", "ATAC"):
            assert any(isinstance(x, DomainBatchNorm1d) for x in model.encoders[m].modules()) == encoders
            assert any(isinstance(x, DomainBatchNorm1d) for x in model.decoders[m].modules()) == decoders
        if encoders:
            # The encoders' input normalisation (over the view of the measured values) comes first
            # and is the only one marked as over the input.
            flags = [x.normalises_input for x in model.encoders["RNA"].modules() if isinstance(x, DomainBatchNorm1d)]
            assert flags == [True] + [False] * (len(flags) - 1)
            assert model.encoders["RNA"].input_norm is not None
        if decoders:
            assert model.decoders["RNA"].input_norm is None


def test_domain_norm_removes_a_per_domain_shift_of_the_input():
    """Two domains that differ only by a constant shift of the view embed alike under per-domain
    statistics (the shift is what per-domain BatchNorm removes), not under shared ones."""
    torch.manual_seed(0)
    rna, atac = _data(n=64)
    twice_rna, twice_atac = sp.vstack([rna, rna]).tocsr(), sp.vstack([atac, atac]).tocsr()
    batch = csr_to_batch({"RNA": twice_rna, "ATAC": twice_atac}, domain=np.repeat([0, 1], 64))
    for where in ("none", "encoders"):
        cfg = CVQVAEConfig(view_components=8, hidden=(16, 8), latent_dim=4, codebook_size=16, domain_norm=where)
        model = build_model(cfg, {"RNA": 30, "ATAC": 50}, n_domains=2)
        model.fit_views({"RNA": rna, "ATAC": atac})
        model.train()
        with torch.no_grad():
            # The same cells in both domains, seen with a shifted first view coordinate in domain 1.
            shift = torch.zeros(8)
            shift[0] = 5.0
            h = model.views["RNA"](batch["RNA_ids"], batch["RNA_values"], batch["RNA_mask"])
            h[64:] += shift
            out = model.encoders["RNA"](h, batch["domain"])
        gap = (out[:64] - out[64:]).abs().max().item()
        if where == "none":
            assert gap > 1e-3
        else:
            assert gap < 1e-4


def test_self_reconstruction_adds_the_own_modality_terms():
    torch.manual_seed(0)
    model, batch = _model(self_weight=0.0)
    torch.manual_seed(0)
    model_self, _ = _model(self_weight=2.0)
    model_self.load_state_dict(model.state_dict())
    model.eval()
    model_self.eval()
    plain, with_self = model(batch), model_self(batch)
    assert float(plain["self_recon"]) == 0.0
    assert float(with_self["self_recon"]) > 0
    torch.testing.assert_close(with_self["loss"], plain["loss"] + 2.0 * with_self["self_recon"])


def test_domain_norm_model_round_trips_and_embeds_unseen_domains():
    model, batch = _two_domain_model("all", self_weight=1.0)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    unseen = {**batch, "domain": torch.full_like(batch["domain"], -1)}
    z = model.embed(unseen)
    assert torch.isfinite(z).all() and z.shape == (64, 4)
    assert model.predict_other(unseen, "RNA")["features"].shape == (64, 50)
    cfg = CVQVAEConfig(domain_norm="encoders", self_weight=0.5)
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
