"""CVQVAE: a cross-trained, vector-quantised autoencoder for two paired modalities.

For paired cells (e.g. SNARE-seq RNA + ATAC) encoder E1 reads modality S1 and encoder E2 reads
S2. Each latent is quantised to its nearest codebook vector and decoded by the *other*
modality's decoder: E1 → D2 reconstructs S2, E2 → D1 reconstructs S1. An encoder can only
succeed by extracting what predicts the other modality, which aligns the two latent spaces;
a third term ``λ3‖z1 − z2‖²`` pulls the two latents of a cell together::

    L = λ1 · L(E1, D2, K1) + λ2 · L(E2, D1, K2) + λ3 · ‖z1 − z2‖²
    L(E, D, K) = ‖D(q(z)) − target‖² + β ‖z − sg(q(z))‖²   (the codebook moves by EMA)
    (+ self_weight · (‖D1(q(z1)) − S1‖² + ‖D2(q(z2)) − S2‖²) when ``self_weight`` > 0)

``quantize=False`` gives the paper's ablation ("CVAE"): the same cross-training with the
decoder reading the continuous z.

Two options the published method lacks (``domain_norm="none", self_weight=0`` is the published
objective), both on by default:
``domain_norm`` (per-domain BatchNorm statistics in the encoders, and optionally the decoders,
as Concerto removes batch effects; the published model has no batch mechanism, while atlases
integrate libraries) and ``self_weight`` (each modality also reconstructs itself, so a latent
keeps what the *other* modality cannot predict). Both were chosen on held-out reference
libraries of MOp (``benchmarks/validate_cvqvae.py``: joint scIB overall 0.563 → 0.618).

Downstream, a cell's embedding is the continuous (pre-quantisation) z: the mean of z1 and z2
for a paired cell, the available one otherwise. ``predict_other`` decodes one modality into the
other (E1 → quantise → D2), which is missing-modality prediction for an RNA-only query.

**Input views — default ``"pca_lsi"``.** Encoders read, and decoders reconstruct, fixed
low-dimensional views fitted on the reference: PCA of log-normalised RNA (or protein) and LSI
(TF-IDF + truncated SVD) of ATAC, stored as buffers with the model. This is the published
method, and it is the better default for the data CVQVAE is meant for: SNARE-seq/multiome
cells have ~100–2,000 non-zeros among 10⁴–10⁵ peaks, and reconstructing a dense vector over
every peak would spend the loss (and compute, O(B × n_peaks) per step) on noise, whereas the
view is denoised, dense and small. ``"learned"`` (a sparse learned input layer, decoders over
the full feature vector) needs no fitting pass and is kept for open vocabularies; it is
selected in the config. Views must be fitted (``fit_views``) before training.
"""

from __future__ import annotations

from collections.abc import Mapping

import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from atlas.models.concerto import eval_mode, modality_present
from atlas.models.config import CVQVAEConfig
from atlas.models.layers import SkipMLP, VectorQuantizerEMA
from atlas.models.views import LearnedView, LSIView, PCAView
from atlas.names import csr_columns

Batch = Mapping[str, torch.Tensor]


def make_view(
    modality: str, n_features: int, config: CVQVAEConfig
) -> PCAView | LSIView | LearnedView:
    """The input view of one modality for a config (LSI for ATAC, PCA otherwise)."""
    if config.input_view == "learned":
        return LearnedView(n_features, config.view_components)
    if config.input_view != "pca_lsi":
        raise ValueError(f"unknown input_view {config.input_view!r}")
    if modality == "ATAC":
        return LSIView(n_features, config.view_components, config.lsi_drop_first, config.atac_values)
    return PCAView(n_features, config.view_components)


class CVQVAE(nn.Module):
    """Cross-trained VQ autoencoder over ``config.modalities = (S1, S2)``.

    ``forward(batch)`` → dict of tensors: ``loss`` (to back-propagate), ``recon_1to2``,
    ``recon_2to1``, ``align``, ``commitment``, ``perplexity_1``/``_2``, ``usage_1``/``_2``,
    ``n_pairs``. Only cells with both modalities contribute to the loss.
    """

    def __init__(self, config: CVQVAEConfig, vocab_sizes: dict[str, int], n_domains: int):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.modalities)
        self.n_domains = n_domains
        self.views = nn.ModuleDict({m: make_view(m, vocab_sizes[m], config) for m in self.modalities})
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        hidden = tuple(config.hidden)
        encoder_domains = n_domains if config.domain_norm in ("encoders", "all") else 0
        decoder_domains = n_domains if config.domain_norm == "all" else 0
        for m, view in self.views.items():
            in_dim = view.in_dim if isinstance(view, LearnedView) else view.out_dim
            self.encoders[m] = SkipMLP(in_dim, hidden, config.latent_dim, config.dropout, encoder_domains,
                                       input_norm=True)
            # decoders[m] reconstructs modality m (from the *other* modality's latent).
            self.decoders[m] = SkipMLP(config.latent_dim, hidden[::-1], view.out_dim, config.dropout,
                                       decoder_domains)
        self.quantizers = nn.ModuleDict()
        if config.quantize:
            make_vq = lambda: VectorQuantizerEMA(  # noqa: E731
                config.codebook_size, config.latent_dim, config.decay, config.eps, config.beta,
                config.dead_threshold,
            )
            shared = make_vq() if config.shared_codebook else None
            for m in self.modalities:
                self.quantizers[m] = shared if shared is not None else make_vq()

    @property
    def normalisation_depth(self) -> int:
        """Longest chain of per-domain normalisation layers (input + one per block of the
        encoders; decoders' layers are recorded only when decoding): the recalibration passes
        that make every encoder layer exact."""
        return 1 + len(self.config.hidden) if self.config.domain_norm != "none" else 0

    # -- views ---------------------------------------------------------------------------------
    def fit_views(
        self, counts: Mapping[str, sp.spmatrix], max_cells: int | None = 50_000, seed: int = 0
    ) -> CVQVAE:
        """Fit the PCA/LSI views on reference raw-count CSR matrices (cells × vocabulary ids),
        e.g. a random sample of reference cells. No-op for ``input_view="learned"``."""
        for m, view in self.views.items():
            if isinstance(view, (PCAView, LSIView)):
                view.fit(counts[m], max_cells=max_cells, seed=seed)
        return self

    def _inputs(self, batch: Batch, m: str, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(batch[f"{m}_{k}"][rows] for k in ("ids", "values", "mask"))

    def encode(self, batch: Batch, modality: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous latent z [n, latent_dim] of ``modality`` for the given rows (default all)."""
        if rows is None:
            rows = torch.arange(batch["domain"].shape[0], device=batch["domain"].device)
        ids, values, mask = self._inputs(batch, modality, rows)
        return self.encoders[modality](self.views[modality](ids, values, mask), batch["domain"][rows])

    def _quantize(self, z: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        if not self.config.quantize:
            zero = z.new_zeros(())
            return {"quantized": z, "commitment": zero, "perplexity": zero, "usage": zero}
        return self.quantizers[modality](z)

    # -- training ------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        s1, s2 = self.modalities
        lam1, lam2, lam3 = self.config.lambdas
        paired = modality_present(batch, s1) & modality_present(batch, s2)
        rows = paired.nonzero(as_tuple=True)[0]
        device = batch["domain"].device
        if rows.numel() < 2:
            # BatchNorm needs two cells; return a zero loss that still touches every parameter so
            # DDP's gradient synchronisation finds them all.
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            out = {k: torch.zeros((), device=device) for k in (
                "recon_1to2", "recon_2to1", "align", "self_recon", "commitment",
                "perplexity_1", "perplexity_2", "usage_1", "usage_2")}
            return {"loss": zero, **out, "n_pairs": torch.zeros((), device=device)}
        x1, x2 = self._inputs(batch, s1, rows), self._inputs(batch, s2, rows)
        domain = batch["domain"][rows]
        z1 = self.encoders[s1](self.views[s1](*x1), domain)
        z2 = self.encoders[s2](self.views[s2](*x2), domain)
        q1, q2 = self._quantize(z1, s1), self._quantize(z2, s2)
        # Cross-decoding through BOTH decoders: E1 → D2 reconstructs S2, E2 → D1 reconstructs S1.
        recon_2 = self.decoders[s2](q1["quantized"], domain)
        recon_1 = self.decoders[s1](q2["quantized"], domain)
        loss_12 = F.mse_loss(recon_2.float(), self.views[s2].target(*x2))
        loss_21 = F.mse_loss(recon_1.float(), self.views[s1].target(*x1))
        align = F.mse_loss(z1.float(), z2.float())
        commitment = q1["commitment"] + q2["commitment"]
        loss = (
            lam1 * (loss_12 + q1["commitment"])
            + lam2 * (loss_21 + q2["commitment"])
            + lam3 * align
        )
        self_recon = torch.zeros((), device=device)
        if self.config.self_weight > 0:
            self_recon = (F.mse_loss(self.decoders[s1](q1["quantized"], domain).float(), self.views[s1].target(*x1))
                          + F.mse_loss(self.decoders[s2](q2["quantized"], domain).float(), self.views[s2].target(*x2)))
            loss = loss + self.config.self_weight * self_recon
        return {
            "loss": loss,
            "recon_1to2": loss_12.detach(),
            "recon_2to1": loss_21.detach(),
            "align": align.detach(),
            "self_recon": self_recon.detach(),
            "commitment": commitment.detach(),
            "perplexity_1": q1["perplexity"].detach(),
            "perplexity_2": q2["perplexity"].detach(),
            "usage_1": q1["usage"].detach(),
            "usage_2": q2["usage"].detach(),
            "n_pairs": torch.tensor(float(rows.numel()), device=device),
        }

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, batch: Batch) -> torch.Tensor:
        """Pre-quantisation latent [B, latent_dim]: mean of z1 and z2 for paired cells, the
        present modality's z otherwise, zeros for cells with neither. Eval mode, deterministic."""
        n = batch["domain"].shape[0]
        device = batch["domain"].device
        total = torch.zeros(n, self.config.latent_dim, device=device)
        count = torch.zeros(n, 1, device=device)
        with eval_mode(self):
            for m in self.modalities:
                if csr_columns(m)[0] not in batch:
                    continue
                rows = modality_present(batch, m).nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                total.index_add_(0, rows, self.encode(batch, m, rows).float())
                count.index_add_(0, rows, torch.ones(rows.numel(), 1, device=device))
        return total / count.clamp_min(1.0)

    @torch.no_grad()
    def predict_other(self, batch: Batch, modality_in: str) -> dict[str, torch.Tensor]:
        """Cross-modal prediction: encode ``modality_in``, quantise (if the model quantises),
        decode with the other modality's decoder.

        Returns ``{"view": [B, k], "features": [B, n_features]}`` for the target modality
        (``target_modality(modality_in)``):
        the prediction in the target modality's view space and mapped back to its features
        (vocabulary ids = column index; values on the batches' scale, log-normalised).
        Rows of cells without ``modality_in`` are zeros.
        """
        target = self.target_modality(modality_in)
        view_out = self.views[target]
        n = batch["domain"].shape[0]
        device = batch["domain"].device
        pred_view = torch.zeros(n, view_out.out_dim, device=device)
        with eval_mode(self):
            rows = modality_present(batch, modality_in).nonzero(as_tuple=True)[0]
            if rows.numel():
                z = self.encode(batch, modality_in, rows)
                q = self._quantize(z, modality_in)["quantized"]
                pred_view[rows] = self.decoders[target](q, batch["domain"][rows]).float()
            features = view_out.inverse(pred_view)
            features[modality_present(batch, modality_in).logical_not()] = 0.0
        return {"view": pred_view, "features": features}

    def target_modality(self, modality_in: str) -> str:
        """The modality ``predict_other(batch, modality_in)`` predicts."""
        if modality_in not in self.modalities:
            raise ValueError(f"{modality_in!r} is not one of {self.modalities}")
        return self.modalities[1] if modality_in == self.modalities[0] else self.modalities[0]

    @torch.no_grad()
    def view(self, batch: Batch, modality: str) -> torch.Tensor:
        """The reconstruction target of ``modality`` for every cell of the batch (view space),
        to score ``predict_other`` against held-out measurements."""
        rows = torch.arange(batch["domain"].shape[0], device=batch["domain"].device)
        return self.views[modality].target(*self._inputs(batch, modality, rows))
