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

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from atlas.models.layers import DomainBatchNorm1d

T = TypeVar("T")

RECALIBRATION_PASSES = 2
"""Passes over the reference: enough for the teacher (value normalisation → pooled normalisation)."""


def normalisation_passes(model: nn.Module) -> int:
    """Passes that make every normalisation layer exact: the length of the longest chain of
    them (a model's ``normalisation_depth``, e.g. CVQVAE's encoder depth), else
    :data:`RECALIBRATION_PASSES`."""
    return int(getattr(model, "normalisation_depth", RECALIBRATION_PASSES))


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
        flat = torch.as_tensor(np.array(vector, dtype=np.float64))
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


def has_domain_normalisation(model: nn.Module, layers: str = "all") -> bool:
    """Whether the model has a :class:`DomainBatchNorm1d` (over its inputs, for ``"input"``):
    only those can adapt to a query."""
    return any(isinstance(m, DomainBatchNorm1d) and (layers == "all" or m.normalises_input) for m in model.modules())


def add_query_domains(model: nn.Module, n_query: int) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose normalisation layers hold ``n_query`` more domains (unset: they
    use the reference average until :meth:`DomainStatistics.apply` or :func:`set_query_statistics`
    sets them); returns ``(copy, code of the first query domain)``. ``model`` is left untouched
    (a Serve replica may embed other requests with it meanwhile)."""
    adapted = copy.deepcopy(model)
    layers = [m for m in adapted.modules() if isinstance(m, DomainBatchNorm1d)]
    offset = max((m.n_domains for m in layers), default=0)
    for m in layers:
        m.n_reference = m.n_domains if m.n_reference is None else m.n_reference
        extra = offset + n_query - m.n_domains
        m.running_mean = torch.cat([m.running_mean, m.running_mean.new_zeros(extra, m.num_features)])
        m.running_var = torch.cat([m.running_var, m.running_var.new_ones(extra, m.num_features)])
        m.domain_batches = torch.cat([m.domain_batches, m.domain_batches.new_zeros(extra)])
        m.n_domains = offset + n_query
    return adapted, offset


def query_statistics(adapted: nn.Module, offset: int) -> dict[str, np.ndarray]:
    """The query domains' rows of every normalisation layer (``{name.mean|var|set: array}``),
    to ship to other processes (the offline mapper's actors)."""
    out = {}
    for name, m in adapted.named_modules():
        if isinstance(m, DomainBatchNorm1d):
            out[f"{name}.mean"] = m.running_mean[offset:].cpu().numpy()
            out[f"{name}.var"] = m.running_var[offset:].cpu().numpy()
            out[f"{name}.set"] = (m.domain_batches[offset:] > 0).cpu().numpy()
    return out


@torch.no_grad()
def set_query_statistics(adapted: nn.Module, offset: int, statistics: dict[str, np.ndarray],
                         keep: np.ndarray | None = None) -> None:
    """Put :func:`query_statistics` back into a copy from :func:`add_query_domains`; query domains
    not in ``keep`` (bool per query domain) stay unset (the reference average)."""
    for name, m in adapted.named_modules():
        if isinstance(m, DomainBatchNorm1d):
            is_set = np.asarray(statistics[f"{name}.set"], dtype=bool)
            if keep is not None:
                is_set = is_set & np.asarray(keep, dtype=bool)
            m.running_mean[offset:] = torch.as_tensor(statistics[f"{name}.mean"]).to(m.running_mean)
            m.running_var[offset:] = torch.as_tensor(statistics[f"{name}.var"]).to(m.running_var)
            m.domain_batches[offset:] = torch.as_tensor(is_set.astype(np.int64)).to(m.domain_batches)


QUERY_LAYERS = ("input", "all")


@torch.no_grad()
def with_query_domains(model: nn.Module, n_query: int, forward: Callable[[nn.Module, int], None],
                       layers: str = "input", passes: int | None = None, deep: np.ndarray | None = None
                       ) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose normalisation layers also hold ``n_query`` query domains, set to
    the exact statistics of each domain's own cells; returns ``(copy, first query domain code)``.

    ``layers``: ``"input"`` adapts only the layers over the measured values (their scale in the
    query's protocol, :attr:`DomainBatchNorm1d.normalises_input`; one pass), deeper layers keep
    the reference average; ``"all"`` adapts every layer (``passes`` passes, as layers feed each
    other; default :func:`normalisation_passes`). Deeper layers normalise learned features whose
    mean depends on the batch's cell-type mix: adapting them erases the biology of a batch whose
    composition differs from the reference's (a sorted T-cell study fell from 0.78 to 0.40 level-1 accuracy on held-out
    reference studies, while whole-blood studies gained 0.5 points): mapping chooses per batch by
    its estimated cell-type mix (``domain_statistics="auto"``, :mod:`atlas.mapping.composition`).

    ``deep`` (with ``"all"``; bool per query domain, default every one): which domains adapt the
    deeper layers too; the others adapt their input layers only (how ``domain_statistics="auto"``
    applies its per-batch choice, :func:`atlas.mapping.composition.choose_layers`).

    ``forward(copy, offset)`` must run the copy (eval mode) over every query cell with domain
    ``offset + j`` for a cell of query domain ``j`` (``-1`` for cells that keep the reference
    average). ``model`` is left untouched.
    """
    adapted, offset = add_query_domains(model, n_query)
    passes = normalisation_passes(model) if passes is None else passes
    for _ in range(query_passes(layers, passes) if n_query and has_domain_normalisation(model, layers) else 0):
        record_pass(adapted, offset, lambda: forward(adapted, offset), layers, deep)
    return adapted, offset


@torch.no_grad()
def record_pass(adapted: nn.Module, offset: int, run: Callable[[], T], layers: str = "input",
                deep: np.ndarray | None = None) -> T:
    """One recording pass over a copy from :func:`add_query_domains`: ``run()`` (a forward pass
    over query cells), then every recorded domain's statistics set exactly, and the layers that
    ``layers`` / ``deep`` do not adapt unset again (:func:`keep_query_layers`); returns what
    ``run`` returned."""
    statistics = DomainStatistics(adapted)
    with statistics.recording():
        result = run()
    statistics.apply()
    keep_query_layers(adapted, offset, layers, deep)
    return result


def query_passes(layers: str, passes: int = RECALIBRATION_PASSES) -> int:
    """Recording passes a query needs: one for the input layers (nothing feeds them), else ``passes``."""
    if layers not in QUERY_LAYERS:
        raise ValueError(f"layers must be one of {QUERY_LAYERS}, got {layers!r}")
    return passes if layers == "all" else 1


@torch.no_grad()
def keep_query_layers(adapted: nn.Module, offset: int, layers: str, deep: np.ndarray | None = None) -> None:
    """Unset the query domains of the layers ``layers`` does not adapt (back to the reference
    average); with ``"all"`` and ``deep`` (bool per query domain), the deeper layers of the
    domains it leaves out too."""
    for m in adapted.modules():
        if not isinstance(m, DomainBatchNorm1d) or m.normalises_input:
            continue
        if layers != "all":
            m.domain_batches[offset:] = 0
        elif deep is not None:
            keep = torch.as_tensor(np.asarray(deep, dtype=bool))
            m.domain_batches[offset : offset + keep.numel()][~keep] = 0
