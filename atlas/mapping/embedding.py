"""The frozen model over prepared query cells: :func:`embed_prepared` (offline, the Serve
encoder deployment and the offline mapper's actors all call it), with the query's own
normalisation statistics per domain (:mod:`atlas.mapping.domains`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from atlas.data.batches import csr_to_batch
from atlas.models.recalibrate import (
    DomainStatistics,
    add_query_domains,
    has_domain_normalisation,
    keep_query_layers,
    normalisation_passes,
    record_pass,
    with_query_domains,
)
from atlas.train.step import autocast_context


def embed_prepared(aligned: Mapping[str, sp.csr_matrix], model: Any, *, max_features: int | None = None,
                   batch_size: int = 1024, device: str = "cpu", decode: Mapping[str, str] | None = None,
                   domains: np.ndarray | None = None, layers: str = "input", domains_set: bool = False,
                   deep: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embed prepared cells with the frozen model, ``batch_size`` cells at a time (bounded memory).

    ``domains`` (int per cell, see :mod:`atlas.mapping.domains`): cells of query domain ``j ≥ 0``
    are normalised with the exact statistics of that domain's cells in the ``layers`` chosen
    (``"input"``: one extra pass over them; ``"all"``: two; with ``"all"``, ``deep`` — bool per
    query domain — limits the deeper layers to the domains it marks);
    cells with ``-1`` (or every cell, without ``domains``) enter as an unseen domain: Concerto
    uses the mean of its reference domains' statistics. ``decode`` (``{target: source}``, CVQVAE
    only) also returns the decoder's cross-modal prediction of each target over its vocabulary
    (log-normalised scale). ``domains_set``: ``domains`` are the model's own codes of statistics
    already set (:class:`~atlas.mapping.domains.FixedDomains`): no recording.
    """
    n = next(iter(aligned.values())).shape[0]
    codes = np.full(n, -1) if domains is None else np.asarray(domains, dtype=np.int64)
    if not domains_set and (codes >= 0).any():
        if has_domain_normalisation(model, layers):
            def record(copy: Any, offset: int) -> None:
                forward(aligned, copy, np.where(codes >= 0, codes + offset, -1), max_features, batch_size, device, {})

            model, offset = with_query_domains(model, int(codes.max()) + 1, record, layers=layers, deep=deep)
            codes = np.where(codes >= 0, codes + offset, -1)
        else:
            codes = np.full(n, -1)
    return forward(aligned, model, codes, max_features, batch_size, device, dict(decode or {}))


#: ``choose(input-statistics embedding, query domain per cell, number of query domains) ->
#: (mix overlap per domain, whether each domain adapts every layer)``
Chooser = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def embed_auto(aligned: Mapping[str, sp.csr_matrix], model: Any, domains: np.ndarray, choose: Chooser, *,
               max_features: int | None = None, batch_size: int = 1024, device: str = "cpu",
               decode: Mapping[str, str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray,
                                                                 np.ndarray]:
    """``domain_statistics="auto"`` in one go: ``(embedding, decoded, overlap, deep)``.

    The same result as embedding with input statistics, letting ``choose`` pick the domains that
    adapt every layer, and embedding again with :func:`embed_prepared` (``layers="all"``, ``deep``)
    — in ``passes + 1`` forward passes instead of ``passes + 3``: the pass that embeds with input
    statistics also records what the deeper layers see (exact, as the input layers feeding them
    are), and only the cells of the chosen domains are embedded again.
    """
    codes = np.asarray(domains, dtype=np.int64)
    n_query = int(codes.max()) + 1 if codes.size and codes.max() >= 0 else 0
    decode = dict(decode or {})
    if not n_query or not has_domain_normalisation(model, "input"):
        emb, decoded = embed_prepared(aligned, model, max_features=max_features, batch_size=batch_size, device=device,
                                      decode=decode, domains=codes, layers="input")
        return emb, decoded, np.full(n_query, np.nan), np.zeros(n_query, dtype=bool)
    adapted, offset = add_query_domains(model, n_query)
    shifted = np.where(codes >= 0, codes + offset, -1)

    def run(rows: np.ndarray | None, wanted: Mapping[str, str], statistics: DomainStatistics | None = None):
        cells = aligned if rows is None else {m: x[rows] for m, x in aligned.items()}
        at = shifted if rows is None else shifted[rows]
        if statistics is None:
            return forward(cells, adapted, at, max_features, batch_size, device, wanted)
        with statistics.recording():
            return forward(cells, adapted, at, max_features, batch_size, device, wanted)

    record_pass(adapted, offset, lambda: run(None, {}), "input")  # nothing feeds the input layers: exact
    deeper = DomainStatistics(adapted)
    # A decoder's own layers must not record (embed_prepared never records them): decode later.
    emb, decoded = run(None, {}, deeper)
    overlap, deep = choose(emb, codes, n_query)
    deep = np.asarray(deep, dtype=bool)
    if not deep.any():
        if decode:
            emb, decoded = run(None, decode)
        return emb, decoded, np.asarray(overlap, dtype=np.float64), deep
    deeper.apply()
    keep_query_layers(adapted, offset, "all", deep)
    rows = np.flatnonzero((codes >= 0) & deep[np.clip(codes, 0, None)])
    for _ in range(normalisation_passes(model) - 2):  # longer chains of normalisation layers
        record_pass(adapted, offset, lambda: run(rows, {}), "all", deep)
    if decode:  # every cell once more, with its decoder outputs
        emb, decoded = run(None, decode)
    else:
        emb[rows] = run(rows, {})[0]
    return emb, decoded, np.asarray(overlap, dtype=np.float64), deep


def max_features_of(manifest: Mapping[str, Any]) -> int | None:
    """The build's cap on features per cell (the query is embedded under the same cap)."""
    return (manifest.get("build_config", {}).get("data", {}) or {}).get("max_features")


def local_embed(model: Any, manifest: Mapping[str, Any], *, batch_size: int = 1024, device: str = "cpu",
                domains_set: bool = False, heads: Any = None) -> Any:
    """``embed(aligned, decode, domains) -> (embedding, decoded, domains used)`` over a model in
    this process: what :func:`~atlas.mapping.query.map_query` runs, and what the Serve encoder
    deployment runs for the ingress (``domains``: :class:`~atlas.mapping.domains.QueryDomains` or
    None; ``domains_set``: their statistics are already in ``model``; ``heads``: the atlas's label
    heads, which ``"auto"`` estimates each batch's mix with)."""
    max_features = max_features_of(manifest)

    def embed(aligned: Mapping[str, sp.csr_matrix], decode: Mapping[str, str], domains: Any):
        if domains is not None and domains.layers == "auto" and not domains_set:
            return embed_resolving(aligned, model, domains, heads, manifest, max_features=max_features,
                                   batch_size=batch_size, device=device, decode=decode)
        emb, decoded = embed_prepared(
            aligned, model, max_features=max_features, batch_size=batch_size, device=device, decode=dict(decode),
            domains=None if domains is None else domains.codes, layers="input" if domains is None else domains.layers,
            domains_set=domains_set, deep=None if domains is None or domains.deep is None else np.asarray(domains.deep))
        return emb, decoded, domains

    return embed


def embed_resolving(aligned: Mapping[str, sp.csr_matrix], model: Any, domains: Any, heads: Any,
                    manifest: Mapping[str, Any], **options: Any) -> tuple[np.ndarray, dict[str, np.ndarray], Any]:
    """:func:`embed_auto` for ``QueryDomains(codes, "auto", min_overlap=…)``; returns the
    :class:`~atlas.mapping.domains.QueryDomains` it resolved to (``"all"`` with ``deep``, or
    ``"input"``; ``overlap`` per domain)."""
    from atlas.mapping.composition import MIN_OVERLAP, ReferenceMix, mix_chooser
    from atlas.mapping.domains import QueryDomains

    reference = ReferenceMix.of(manifest, heads)
    if reference is None:
        raise ValueError("domain_statistics='auto' needs the atlas's label heads and reference composition")
    choose = mix_chooser(heads, reference, MIN_OVERLAP if domains.min_overlap is None else domains.min_overlap)
    emb, decoded, overlap, deep = embed_auto(aligned, model, domains.codes, choose, **options)
    resolved = QueryDomains(domains.codes, "all" if deep.any() else "input",
                            tuple(bool(d) for d in deep) if deep.any() else None,
                            overlap=tuple(float(o) for o in overlap))
    return emb, decoded, resolved


def forward(aligned: Mapping[str, sp.csr_matrix], model: Any, domains: np.ndarray, max_features: int | None,
             batch_size: int, device: str, decode: Mapping[str, str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = next(iter(aligned.values())).shape[0]
    chunks: list[np.ndarray] = []
    decoded: dict[str, list[np.ndarray]] = {m: [] for m in decode}
    # One precision rule for reference and query (atlas.embed uses the same context): bf16
    # autocast on CUDA, fp32 elsewhere; normalisation statistics are fp32 either way.
    with torch.no_grad(), autocast_context(device):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = csr_to_batch({m: x[start:stop] for m, x in aligned.items()},
                                 domain=domains[start:stop], normalize=False, max_features=max_features)
            batch = {k: v.to(device) for k, v in batch.items()}
            chunks.append(model.embed(batch).float().cpu().numpy())
            for target, source in decode.items():
                decoded[target].append(model.predict_other(batch, source)["features"].float().cpu().numpy())
    dim = getattr(model, "embedding_dim", None) or model.config.latent_dim
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return emb.astype(np.float32), {m: np.concatenate(v).astype(np.float32) for m, v in decoded.items() if v}
