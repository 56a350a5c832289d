"""Concerto: contrastive self-distillation between an attention teacher and a dense student.

A cell enters as its measured features (vocabulary ids) and their normalised values. Two
networks read the same cell:

* the **teacher** embeds each feature id, scales the embedding by the feature's value (after a
  one-channel BatchNorm of the values, as in the original), pools the
  features with attention (the attention weights are per-cell feature importances), then
  tanh → domain-specific BatchNorm → dropout → Dense(ReLU);
* the **student** is one dense layer over the full value vector (computed sparsely), then
  domain-specific BatchNorm → dropout → ReLU.

Training pulls the teacher and student views of the same cell together and pushes views of other
cells apart (NT-Xent, τ = 0.1). The two independent dropout masks are the only augmentation: the
molecular input is never perturbed. After training, the cell's embedding for mapping queries to
the reference is the teacher output (``embedding="teacher"``, the original) or, by default, the
teacher and student outputs each L2-normalised and concatenated: the student is linear in the
expression up to its normalisation, and on held-out reference patients its half moved less under
a donor/condition shift than the attention teacher's (``benchmarks/validate_embedding.py``).
Label heads read the same embedding.

Multimodal cells have one teacher/student pair per modality whose outputs are summed; a cell
lacking a modality simply has no term for it, so an RNA-only query embeds with the RNA teacher
of a multimodal reference.

Data parallelism: ``forward(batch)`` returns the loss, so DDP synchronises gradients. With
``gather_negatives`` the outputs of all workers are all-gathered (with gradients) and each
worker's cells see every worker's cells as negatives — the effective batch is the global one,
as in the single-GPU original. Off by default because the all-gather costs a collective per step
and requires every worker to call forward the same number of times. Workers may have different
numbers of cells (they are padded and masked). If a batch can lack a modality entirely, wrap the
model with ``DDP(find_unused_parameters=True)``, since that modality's networks get no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from atlas.models.config import ConcertoConfig
from atlas.models.heads import LabelHeads
from atlas.models.layers import UNSEEN_DOMAIN, DomainBatchNorm1d, MaskedAttentionPool, SparseLinear
from atlas.names import csr_columns

Batch = Mapping[str, torch.Tensor]

HEAD_SCALE = 10.0
"""Logit scale of the heads over an L2-normalised embedding (a cosine classifier; the
temperature of NT-Xent is 0.1 too)."""


def modality_present(batch: Batch, modality: str) -> torch.Tensor:
    """[B] bool: which cells of the batch have at least one value of ``modality``."""
    key = f"{modality}_mask"
    if key not in batch:
        return torch.zeros(batch["domain"].shape[0], dtype=torch.bool, device=batch["domain"].device)
    return batch[key].any(1)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily switch a module to eval mode (restoring the previous mode afterwards)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


#: Packed feature entries scored per pass on the CPU by the fused pooling (fastest of 2k-32k on
#: pbmc10k: 4k-16k within 5 %; one pass over all of them was 2.5x slower, out of cache).
FUSED_CHUNK = 8192


class ConcertoTeacher(nn.Module):
    """Feature-id embedding × value → masked attention pooling → tanh → DSBN → dropout → Dense(ReLU)."""

    def __init__(self, n_features: int, dim: int, dropout: float, n_domains: int):
        super().__init__()
        self.embedding = nn.Embedding(n_features, dim)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        # One-channel BatchNorm on the values (as in the original): standardised values make
        # ``e_i * v_i`` vary in sign and size around 0, so the attention can depend on how much
        # of a feature a cell has rather than saturating tanh for every abundant feature.
        # Per domain: trained on single-domain minibatches, a plain BatchNorm standardised each
        # domain's values by that domain's statistics, but at inference applied one running
        # average dominated by whichever domains came last — a train/inference mismatch that
        # cost 13 points of held-out accuracy on ADTnorm. Domain statistics keep the two equal.
        self.value_norm = DomainBatchNorm1d(1, n_domains, normalises_input=True)
        self.pool = MaskedAttentionPool(dim)
        self.norm = DomainBatchNorm1d(dim, n_domains)
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)

    def _pool(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(pooled [B, D], packed h [N, D], packed weights [N], (rows, cols) of the packed entries)."""
        rows, cols, v = self._packed_values(values, mask, domain)
        h = self.embedding(ids[rows, cols]) * v.unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled, w = self.pool.pool_packed(h, rows, ids.shape[0])
        return pooled, h, w, (rows, cols)

    def _packed_values(
        self, values: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, v)``: where the measured features sit (only they are embedded, never the
        padding) and their values after the value normalisation, packed [N]."""
        rows, cols = mask.nonzero(as_tuple=True)
        if domain is None:
            domain = torch.full((mask.shape[0],), UNSEEN_DOMAIN, dtype=torch.long, device=mask.device)
        v = self.value_norm(values[rows, cols].float().unsqueeze(-1), domain.to(mask.device)[rows])
        return rows, cols, v.squeeze(-1)

    def _pool_fused(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_pool`'s pooled vector and weights, the packed products never materialised
        (:meth:`MaskedAttentionPool.pool_scaled_rows`): what training, embedding and mapping run.
        Same values and gradients as :meth:`_pool` to float rounding (tests), 3x faster forward +
        backward on CPU; :meth:`_pool` stays for :meth:`contributions`, which needs each ``h_i``."""
        rows, cols, v = self._packed_values(values, mask, domain)
        chunk = FUSED_CHUNK if ids.device.type == "cpu" else None  # one pass on a GPU
        pooled, w = self.pool.pool_scaled_rows(self.embedding.weight, ids[rows, cols], v, rows, ids.shape[0], chunk)
        return pooled, w, (rows, cols)

    def forward(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] ids/values/mask, [B] domain → (embedding [B, D], attention weights [B, L])."""
        pooled, w, (rows, cols) = self._pool_fused(ids, values, mask, domain)
        weights = torch.zeros(mask.shape, dtype=w.dtype, device=w.device)
        weights[rows, cols] = w
        x = self.norm(torch.tanh(pooled), domain)
        return F.relu(self.dense(self.dropout(x))), weights

    def contributions(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      domain: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] share of each feature in the pooled vector: ``a_i‖h_i‖ / Σ_j a_j‖h_j‖``.

        ``pooled = Σ a_i h_i`` with ``h_i = e_i · v_i``, so the value enters a feature's part of the
        pooled vector twice (in ``a_i`` and in ``h_i``); the weight ``a_i`` alone is not the
        feature's importance. Trained on real data the teacher learns scores that *decrease* with
        the value for (nearly) every feature — a soft compression of the dynamic range — so a
        cell's dominant marker gets a below-average ``a_i`` but still the largest ``a_i‖h_i‖``.
        """
        _, h, w, (rows, cols) = self._pool(ids, values, mask, domain)
        part = w.float() * h.float().norm(dim=1)
        total = torch.zeros(mask.shape[0], device=part.device).index_add(0, rows, part)
        out = torch.zeros(mask.shape, dtype=torch.float32, device=part.device)
        out[rows, cols] = part / total[rows].clamp_min(1e-12)
        return out


class ConcertoStudent(nn.Module):
    """Dense layer over the full value vector (sparse EmbeddingBag) → DSBN → dropout → ReLU,
    optionally followed by more Dense → DSBN → dropout → ReLU blocks."""

    def __init__(self, n_features: int, dim: int, dropout: float, n_domains: int, blocks: int = 1):
        super().__init__()
        self.input = SparseLinear(n_features, dim)
        self.norms = nn.ModuleList([DomainBatchNorm1d(dim, n_domains) for _ in range(blocks)])
        self.denses = nn.ModuleList([nn.Linear(dim, dim) for _ in range(blocks - 1)])
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, domain: torch.Tensor
    ) -> torch.Tensor:
        x = self.input(ids, values, mask)
        for i, norm in enumerate(self.norms):
            if i > 0:
                x = self.denses[i - 1](x)
            x = F.relu(self.dropout(norm(x, domain)))
        return x


def embedding_head_weights(config: ConcertoConfig, state: Mapping[str, torch.Tensor],
                           n_levels: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each level's heads as one linear map ``(weight [C, embedding_dim], bias [C])`` over the
    cell embedding :meth:`Concerto.embed` returns, from a trained model's ``state``: softmax of
    ``embedding @ weight.T + bias`` equals :meth:`Concerto.head_probabilities` (numpy: the
    service applies heads without torch)."""
    def array(key: str) -> np.ndarray:
        return state[key].detach().cpu().float().numpy()

    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(n_levels):
        weight, bias = array(f"heads.linears.{i}.weight"), array(f"heads.linears.{i}.bias")
        if config.embedding == "teacher+student":
            weight = HEAD_SCALE * np.concatenate([weight, array(f"student_heads.linears.{i}.weight")], axis=1)
            bias = bias + array(f"student_heads.linears.{i}.bias")
        elif config.embedding == "normalised-teacher":
            weight = HEAD_SCALE * weight
        out.append((weight.astype(np.float32), bias.astype(np.float32)))
    return out


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All-gather ``x`` [n, D] from every worker with gradients; rows may differ in number.

    Returns (gathered [W·n_max, D], valid [W·n_max] bool, offset of this worker's rows).
    """
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    n_max = int(torch.stack(sizes).max())
    padded = F.pad(x, (0, 0, 0, n_max - x.shape[0]))
    gathered = torch.cat(all_gather(padded), 0)
    valid = torch.cat(
        [torch.arange(n_max, device=x.device) < int(s) for s in sizes]
    )
    return gathered, valid, rank * n_max


def nt_xent(
    teacher: torch.Tensor,
    student: torch.Tensor,
    temperature: float = 0.1,
    gather_negatives: bool = False,
) -> torch.Tensor:
    """Symmetric NT-Xent (InfoNCE) loss between teacher and student views of the same cells.

    Both views are L2-normalised; for each of the 2N views the positive is the other view of the
    same cell and the 2N − 2 remaining views are negatives; the cross-entropy over cosine
    similarities / ``temperature`` is averaged over the 2N anchors. With ``gather_negatives``
    (and torch.distributed initialised) the candidates are the views of all workers' cells.
    """
    t = F.normalize(teacher.float(), dim=1)
    s = F.normalize(student.float(), dim=1)
    n = t.shape[0]
    anchors = torch.cat([t, s], 0)  # [2n, D]
    distributed = gather_negatives and dist.is_available() and dist.is_initialized()
    if distributed:
        t_all, valid, offset = _gather_with_grad(t)
        s_all, _, _ = _gather_with_grad(s)
        m = t_all.shape[0]
        candidates = torch.cat([t_all, s_all], 0)  # [2m, D]
        cand_valid = torch.cat([valid, valid])
    else:
        m, offset = n, 0
        candidates = anchors
        cand_valid = torch.ones(2 * n, dtype=torch.bool, device=t.device)
    logits = anchors @ candidates.t() / temperature  # [2n, 2m]
    local = torch.arange(n, device=t.device) + offset
    self_idx = torch.cat([local, local + m])
    pos_idx = torch.cat([local + m, local])
    rows = torch.arange(2 * n, device=t.device)
    exclude = ~cand_valid[None, :].expand(2 * n, -1).clone()
    exclude[rows, self_idx] = True
    logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


class Concerto(nn.Module):
    """Concerto for one or several modalities (one teacher/student pair each, outputs summed).

    ``forward(batch)`` → ``{"loss", "n_cells", "positive_cosine"}`` (tensors; the loss is what
    DDP back-propagates). ``embed(batch)`` → cell embedding [B, embedding_dim] in eval mode.
    ``attention(batch, modality)`` → per-feature attention weights aligned with ``{m}_ids``.
    """

    def __init__(self, config: ConcertoConfig, vocab_sizes: dict[str, int], n_domains: int,
                 n_classes: tuple[int, ...] = ()):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.modalities)
        # Without domain-specific BN every cell is normalised as one domain.
        self.n_domains = max(int(n_domains), 1) if config.domain_bn else 1
        d, p = config.embed_dim, config.dropout
        self.teachers = nn.ModuleDict(
            {m: ConcertoTeacher(vocab_sizes[m], d, p, self.n_domains) for m in self.modalities}
        )
        self.students = nn.ModuleDict(
            {
                m: ConcertoStudent(vocab_sizes[m], d, p, self.n_domains, config.student_blocks)
                for m in self.modalities
            }
        )
        # Heads, one per label level of the reference (none: unlabelled). With the concatenated
        # embedding each network has its own heads over its L2-normalised output, trained
        # separately (each network must tell the types apart on its own; one softmax over the
        # concatenation validated worse); mapping adds their logits, which is one linear head over
        # the stored embedding (:func:`embedding_head_weights`).
        self.heads = LabelHeads(d, n_classes) if n_classes else None
        self.student_heads = (LabelHeads(d, n_classes) if n_classes and config.embedding == "teacher+student"
                              else None)
        self.head_weight = float(config.head_weight)
        self.contrastive_weight = 1.0

    @property
    def embedding_dim(self) -> int:
        """Width of :meth:`embed`'s output."""
        return self.config.embed_dim * (2 if self.config.embedding == "teacher+student" else 1)

    def _cell_embedding(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        if self.config.embedding == "teacher+student":
            return torch.cat([F.normalize(teacher.float(), dim=1), F.normalize(student.float(), dim=1)], 1)
        if self.config.embedding == "normalised-teacher":
            return F.normalize(teacher.float(), dim=1)
        return teacher

    def _domain(self, batch: Batch) -> torch.Tensor:
        domain = batch["domain"].long()
        if not self.config.domain_bn:
            # Keep unseen (-1) cells unseen-but-equivalent: one shared set of statistics.
            return torch.zeros_like(domain)
        return domain

    def _views(self, batch: Batch, with_student: bool) -> dict[str, torch.Tensor]:
        domain = self._domain(batch)
        n = domain.shape[0]
        dim = self.config.embed_dim
        device = domain.device
        teacher = torch.zeros(n, dim, device=device)
        student = torch.zeros(n, dim, device=device)
        any_modality = torch.zeros(n, dtype=torch.bool, device=device)
        for m in self.modalities:
            present = modality_present(batch, m)
            if not bool(present.any()):
                continue
            any_modality |= present
            rows = present.nonzero(as_tuple=True)[0]
            # Only cells that have the modality enter its networks (and its BN statistics).
            ids_column, values_column = csr_columns(m)
            ids, values = batch[ids_column][rows], batch[values_column][rows]
            mask = batch[f"{m}_mask"][rows]
            z_t, _ = self.teachers[m](ids, values, mask, domain[rows])
            teacher = teacher.index_add(0, rows, z_t.float())
            if with_student:
                z_s = self.students[m](ids, values, mask, domain[rows])
                student = student.index_add(0, rows, z_s.float())
        return {"teacher": teacher, "student": student, "any": any_modality}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Contrastive loss of one minibatch; cells without any of the model's modalities are
        left out of the loss."""
        views = self._views(batch, with_student=True)
        keep = views["any"]
        t, s = views["teacher"][keep], views["student"][keep]
        if t.shape[0] < 2 and not self.config.gather_negatives:
            # No negatives: a zero loss that still touches the graph (DDP needs a backward).
            contrastive = 0.0 * (t.sum() + s.sum())
        else:
            contrastive = nt_xent(t, s, self.config.temperature, self.config.gather_negatives)
        loss = self.contrastive_weight * contrastive
        out = {"contrastive": contrastive.detach()}
        if self.heads is not None and "labels" in batch:
            labels = batch["labels"][keep]
            if self.config.embedding == "teacher":
                head_loss, _ = self.heads.loss(t, labels)
            else:  # cosine classifiers: each network's heads over its L2-normalised output
                head_loss = self.heads.loss(HEAD_SCALE * F.normalize(t.float(), dim=1), labels)[0]
                if self.student_heads is not None:
                    head_loss = head_loss + self.student_heads.loss(HEAD_SCALE * F.normalize(s.float(), dim=1),
                                                                    labels)[0]
            loss = loss + self.head_weight * head_loss
            out["head_loss"] = head_loss.detach()
        with torch.no_grad():
            pos = (F.normalize(t, dim=1) * F.normalize(s, dim=1)).sum(1).mean() if t.numel() else t.sum()
        return {
            "loss": loss,
            **out,
            "n_cells": torch.tensor(float(t.shape[0]), device=t.device),
            "positive_cosine": pos,
        }

    @torch.no_grad()
    def head_probabilities(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Class probabilities [B, C] of every label level from cell embeddings (none: no heads)."""
        if self.heads is None:
            return []
        if self.config.embedding == "teacher":
            return [torch.softmax(logits.float(), dim=1) for logits in self.heads.logits(embedding)]
        # Cosine heads: the teacher's over the first embed_dim columns (all of them for the
        # normalised teacher), the student's, if any, over the rest; their logits add up.
        d = self.config.embed_dim
        logits = self.heads.logits(HEAD_SCALE * embedding[:, :d].float())
        if self.student_heads is not None:
            student = self.student_heads.logits(HEAD_SCALE * embedding[:, d:].float())
            logits = [a + b for a, b in zip(logits, student)]
        return [torch.softmax(x, dim=1) for x in logits]

    @torch.no_grad()
    def embed(self, batch: Batch) -> torch.Tensor:
        """Embedding [B, :attr:`embedding_dim`] of each cell (eval mode: no dropout, running
        statistics, so the same cell always gets the same vector). Cells with none of the
        model's modalities get the zero vector."""
        with eval_mode(self):
            both = self.config.embedding == "teacher+student"
            views = self._views(batch, with_student=both)
            out = self._cell_embedding(views["teacher"], views["student"])
            return torch.where(views["any"][:, None], out, torch.zeros_like(out))

    @torch.no_grad()
    def attention(
        self, batch: Batch, modality: str | None = None, kind: str = "weight"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature attention of the teacher of ``modality`` (default: the first).

        ``kind="weight"``: the softmax weights ``a_i``. ``kind="contribution"``: each feature's
        share of the pooled vector, ``a_i‖h_i‖ / Σ_j a_j‖h_j‖`` — the feature importance to use
        for interpretation (marker recovery per cell type): the learned scores fall with the
        value, so ``a_i`` alone ranks a cell's dominant markers *last* (see
        :meth:`ConcertoTeacher.contributions`).

        Returns ``(ids, weights)``, both [B, L] aligned with ``batch[f"{modality}_ids"]``;
        weights sum to 1 over a cell's measured features and are 0 on padding (and for cells
        without the modality).
        """
        if kind not in ("weight", "contribution"):
            raise ValueError(f"kind must be 'weight' or 'contribution', got {kind!r}")
        modality = modality or self.modalities[0]
        ids, values, mask = (batch[f"{modality}_{k}"] for k in ("ids", "values", "mask"))
        teacher = self.teachers[modality]
        with eval_mode(self):
            if kind == "contribution":
                return ids, teacher.contributions(ids, values, mask, self._domain(batch))
            _, weights = teacher(ids, values, mask, self._domain(batch))
        return ids, weights
