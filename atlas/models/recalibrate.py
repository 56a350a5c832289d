"""Exact per-domain normalisation statistics of a trained model ("precise BatchNorm").

During training every :class:`~atlas.models.layers.DomainBatchNorm1d` keeps an exponential
moving average of minibatch statistics, taken while the weights were still changing and, with
several Ray Train workers, merged from each worker's own average. On the ADTnorm atlas (336k
cells, 2 workers) those averages differed from the trained model's real per-domain statistics by
a third of a standard deviation in the mean and 2× in the variance, and held-out accuracy rose
from 0.75 to 0.88 when they were replaced by exact ones. :class:`DomainStatistics` records every
such layer's inputs per domain over the reference, in eval mode, and sets the statistics to their
exact mean and unbiased variance. Layers feed each other (the teacher's value normalisation feeds
its pooled normalisation), so the recording is repeated: pass ``k`` is exact for layers ``k``
deep.

Pure torch: the build runs the recording inside Ray Data actors and sums their vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from atlas.models.layers import DomainBatchNorm1d

RECALIBRATION_PASSES = 2
"""Passes over the reference: enough for the teacher (value normalisation → pooled normalisation)."""


class DomainStatistics:
    """Count, sum and sum of squares of each DomainBatchNorm1d layer's inputs, per domain."""

    def __init__(self, model: nn.Module):
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, DomainBatchNorm1d)}
        self.count = {n: torch.zeros(m.n_domains, dtype=torch.float64) for n, m in self.layers.items()}
        self.sum = {n: torch.zeros(m.n_domains, m.num_features, dtype=torch.float64) for n, m in self.layers.items()}
        self.sumsq = {n: torch.zeros(m.n_domains, m.num_features, dtype=torch.float64) for n, m in self.layers.items()}

    @contextmanager
    def recording(self) -> Iterator[DomainStatistics]:
        """Within the block, every forward pass adds its layers' inputs (rows of seen domains)."""

        def hook_for(name: str):
            def hook(module: DomainBatchNorm1d, inputs: tuple) -> None:
                x, domain = inputs[0].detach().double().cpu(), inputs[1].detach().long().cpu()
                keep = (domain >= 0) & (domain < module.n_domains)
                x, domain = x[keep], domain[keep]
                self.count[name].index_add_(0, domain, torch.ones_like(domain, dtype=torch.float64))
                self.sum[name].index_add_(0, domain, x)
                self.sumsq[name].index_add_(0, domain, x * x)
            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def vector(self) -> np.ndarray:
        """Everything recorded as one float64 vector (layers in name order), to sum across actors."""
        parts = [t.reshape(-1) for n in sorted(self.layers) for t in (self.count[n], self.sum[n], self.sumsq[n])]
        return torch.cat(parts).numpy() if parts else np.zeros(0)

    def add_vector(self, vector: np.ndarray) -> None:
        """Add another recorder's :meth:`vector` (of the same model architecture)."""
        flat = torch.as_tensor(np.asarray(vector, dtype=np.float64))
        if flat.numel() != self.vector().size:
            raise ValueError(f"statistics vector of {flat.numel()} values for a model that records {self.vector().size}")
        at = 0
        for n in sorted(self.layers):
            for t in (self.count[n], self.sum[n], self.sumsq[n]):
                t += flat[at : at + t.numel()].reshape(t.shape)
                at += t.numel()

    @torch.no_grad()
    def apply(self, min_count: int = 2) -> dict[str, int]:
        """Set each layer's running statistics of every domain with ≥ ``min_count`` recorded rows
        to the exact mean and unbiased variance; returns domains updated per layer."""
        updated = {}
        for name, module in self.layers.items():
            n = self.count[name]
            have = n >= min_count
            mean = self.sum[name][have] / n[have, None]
            var = (self.sumsq[name][have] - n[have, None] * mean * mean).clamp_min(0) / (n[have, None] - 1)
            module.running_mean[have] = mean.to(module.running_mean.dtype)
            module.running_var[have] = var.to(module.running_var.dtype)
            module.domain_batches[have] = torch.clamp_min(module.domain_batches[have], 1)
            updated[name] = int(have.sum())
        return updated
