"""Per-level classification heads on a cell embedding (supervised use of reference labels).

One linear layer per label level maps the embedding to that level's classes. Training adds a
class-weighted cross-entropy per level to the model's own objective; cells without a label at a
level (code ``-1``: unlabelled, ``undefined``) add nothing at that level. The heads are linear on
the *embedding*, so mapping turns a query's embedding into class probabilities without the
encoder, in numpy (:mod:`atlas.mapping.heads`).

Class imbalance: the weight of class ``c`` is ``(n_c / n_max) ** -power`` (``power`` 0: none,
0.5: inverse square root, 1: balanced), normalised to a cell-weighted mean of 1 so the loss
keeps its scale; :func:`class_weights` computes it from the reference's label counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NO_LABEL = -1
"""Label code of a cell without a label at a level."""


def class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Cross-entropy weight per class from the reference's cell counts per class (float32 [C]).

    Classes without cells get weight 0 (they cannot be learned and must not be predicted).
    """
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros(counts.shape, dtype=np.float64)
    have = counts > 0
    if not have.any():
        return out.astype(np.float32)
    out[have] = (counts[have] / counts[have].max()) ** -float(power)
    out[have] /= (out[have] * counts[have]).sum() / counts[have].sum()
    return out.astype(np.float32)


class LabelHeads(nn.Module):
    """One linear head per label level over an embedding of width ``dim``."""

    def __init__(self, dim: int, n_classes: Sequence[int]):
        super().__init__()
        self.n_classes = tuple(int(c) for c in n_classes)
        self.linears = nn.ModuleList([nn.Linear(dim, c) for c in self.n_classes])
        for i, c in enumerate(self.n_classes):
            self.register_buffer(f"class_weight_{i}", torch.ones(c))

    def __len__(self) -> int:
        return len(self.n_classes)

    def class_weight(self, level: int) -> torch.Tensor:
        weight = getattr(self, f"class_weight_{level}")
        assert isinstance(weight, torch.Tensor)
        return weight

    def logits(self, z: torch.Tensor) -> list[torch.Tensor]:
        """[B, C_level] logits of every level."""
        return [linear(z) for linear in self.linears]

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, labelled cells)``: the sum over levels of each level's class-weighted mean
        cross-entropy over its labelled cells. ``labels`` is [B, levels] (``NO_LABEL`` = none).

        Every head takes part in the graph even when a batch has no label at its level (the loss
        is then an exact 0), so data-parallel gradients stay in step across workers."""
        total = z.new_zeros(())
        labelled = z.new_zeros(())
        for i, logits in enumerate(self.logits(z)):
            if logits.shape[1] == 0:
                continue  # a level without any labelled reference cell: nothing to learn
            target = labels[:, i].long()
            have = target >= 0
            weight = self.class_weight(i).to(logits.dtype)
            per_cell = F.cross_entropy(logits.float(), target.clamp_min(0), weight=weight.float(), reduction="none")
            cell_weight = torch.where(have, weight.float()[target.clamp_min(0)], torch.zeros_like(per_cell))
            total = total + (per_cell * have).sum() / cell_weight.sum().clamp_min(1e-12)
            labelled = labelled + have.sum()
        return total, labelled
