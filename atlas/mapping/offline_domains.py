"""Exact per-batch query statistics for the offline mapper, computed over every block first.

The offline mapper maps a query a block at a time. Statistics taken per block would make each
cell's result depend on which block it fell in; instead, before mapping, Ray Data actors run the
frozen model over every block and return, per query batch, the count, sum and sum of squares of
each normalisation layer's inputs (:class:`~atlas.models.recalibrate.DomainStatistics`, the
same sufficient statistics the build's recalibration sums). The driver adds them up and sets
the statistics of the layers ``domain_statistics`` adapts: one pass for ``"input"``; layers feed
each other, so ``"all"`` takes :func:`~atlas.models.recalibrate.normalisation_passes`. The
mapping actors then embed
every block with the statistics of the whole batch, exactly as :func:`~atlas.mapping.map_query`
does for the whole query in one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from atlas.mapping.composition import ReferenceMix, batch_mix, choose_layers, overlaps, record_choice
from atlas.mapping.domains import FixedDomains, domains_report
from atlas.mapping.params import MapParams
from atlas.mapping.query_source import QueryBlock, QuerySource, block_to_anndata, read_batches


class DomainRecorder:
    """A Ray Data actor: each block → one row (``vector``: the block's recorded statistics,
    ``cells``: its cells with data per query batch)."""

    def __init__(self, atlas_dir: str, features: dict[str, list[str]], names: list[str], batch_key: str | None,
                 batch: str | None, statistics: dict[str, np.ndarray] | None, min_fraction: float,
                 batch_size: int = 1024, use_gpu: bool = False, mix_level: str | None = None):
        import torch

        from atlas.artifact import load_atlas
        from atlas.mapping.embedding import max_features_of
        from atlas.models.recalibrate import add_query_domains, set_query_statistics

        self.atlas = load_atlas(atlas_dir, verify="lazy")
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.offset = add_query_domains(self.atlas.model(self.device), len(names))
        if statistics is not None:
            set_query_statistics(self.model, self.offset, statistics)
        self.lookup = {n: i for i, n in enumerate(names)}
        self.n_batches = len(names)
        self.features, self.batch_key, self.batch = features, batch_key, batch
        self.min_fraction, self.batch_size = min_fraction, batch_size
        self.max_features = max_features_of(self.atlas.manifest)
        # domain_statistics="auto": also sum each batch's head probabilities at this level.
        self.mix_level = mix_level
        self.heads = self.atlas.heads() if mix_level is not None else None

    def __call__(self, table: pa.Table) -> pa.Table:
        from atlas.mapping.domains import batch_labels
        from atlas.mapping.embedding import forward
        from atlas.mapping.query import prepare_query
        from atlas.models.recalibrate import DomainStatistics

        adata = block_to_anndata(table, self.features, self.batch_key)
        aligned, has_data, _ = prepare_query(adata, self.atlas, min_fraction=self.min_fraction)
        labels = batch_labels(adata, self.batch_key, self.batch)
        if labels is None:  # the driver starts no recorder without a batch
            raise ValueError("DomainRecorder needs batch_key or batch")
        codes = np.array([self.lookup[b] for b in labels], dtype=np.int64)
        codes[~has_data] = -1
        recorder = DomainStatistics(self.model)
        with recorder.recording():
            emb, _ = forward(aligned, self.model, np.where(codes >= 0, codes + self.offset, -1), self.max_features,
                             self.batch_size, self.device, {})
        cells = np.bincount(codes[codes >= 0], minlength=self.n_batches).astype(np.int64)
        columns = {"vector": [recorder.vector().tolist()], "cells": [cells.tolist()]}
        if self.heads is not None and self.mix_level is not None:
            sums, _ = batch_mix(self.heads.probabilities(emb)[self.mix_level], codes, self.n_batches)
            columns["mix"] = [sums.reshape(-1).tolist()]
        return pa.table(columns)


def batch_names(source: QuerySource, blocks: Sequence[QueryBlock], batch: str | None
                ) -> tuple[list[str], np.ndarray] | None:
    """The query's batch names (sorted) and cells per batch (every cell, with data or not); None
    when no batch is known (no ``batch_key``, no ``batch``)."""
    if source.batch_key is None:
        return None if batch is None else ([batch], np.array([source.n_cells]))
    labels = np.concatenate([read_batches(source, b) for b in blocks]).astype(str)
    names, counts = np.unique(labels, return_counts=True)
    return [str(n) for n in names], counts


def exact_query_domains(source: QuerySource, blocks: Sequence[QueryBlock], atlas: Any, atlas_dir: str | os.PathLike,
                        params: MapParams, *, actors: int, cpus_per_actor: float, batch_size: int,
                        use_gpu: bool, log: Any = print) -> tuple[FixedDomains, dict[str, np.ndarray]] | None:
    """``(FixedDomains, statistics)`` for the mapping actors, or None when no batch can have its own
    statistics (no batch known, ``domain_statistics="reference"``, or a model without domain
    normalisation)."""
    from atlas.mapping.offline import QueryDatasource
    from atlas.models.recalibrate import (
        DomainStatistics,
        add_query_domains,
        has_domain_normalisation,
        keep_query_layers,
        normalisation_passes,
        query_passes,
        query_statistics,
    )

    layers = params.domain_statistics
    if layers == "reference" or (source.batch_key is None and params.batch is None):
        return None  # decided before loading the model or reading a block: the common case
    model = atlas.model("cpu")
    if not has_domain_normalisation(model, layers):
        return None
    # "auto" = the input layers first (pass 1, as "input"); the next pass embeds with them, which
    # is where each batch's mix is estimated, and records every layer, kept for the batches whose
    # mix is the reference's — as map_query's two embeddings do, in the passes of "all".
    auto = layers == "auto"
    reference = ReferenceMix.of(atlas.manifest, atlas.heads()) if auto else None
    record_layers = "all" if reference is not None else ("input" if auto else layers)
    passes = query_passes(record_layers, normalisation_passes(model))
    passes = max(passes, 2) if reference is not None else passes  # the mix is estimated in pass 2
    known = batch_names(source, blocks, params.batch)
    assert known is not None  # a batch_key or a batch is given
    names, counts = known
    adapted, offset = add_query_domains(model, len(names))
    statistics: dict[str, np.ndarray] | None = None
    with_data: np.ndarray = np.zeros(len(names), dtype=np.int64)
    deep: np.ndarray | None = None
    overlap = np.full(len(names), np.nan)
    for step in range(passes):
        log(f"[map] query statistics, pass {step + 1} of {passes} over {len(blocks)} blocks "
            f"({len(names)} batch{'es' if len(names) > 1 else ''})")
        mix_level = reference.level if reference is not None and step == 1 else None
        ds = ray.data.read_datasource(QueryDatasource(source, blocks), override_num_blocks=len(blocks)).map_batches(
            DomainRecorder,
            fn_constructor_kwargs={"atlas_dir": str(Path(atlas_dir).resolve()), "features": source.features,
                                   "names": names, "batch_key": source.batch_key, "batch": params.batch,
                                   "statistics": statistics,
                                   "min_fraction": params.min_fraction, "batch_size": batch_size,
                                   "use_gpu": use_gpu, "mix_level": mix_level},
            batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor, num_gpus=1 if use_gpu else 0)
        total = DomainStatistics(adapted)
        with_data[:] = 0
        mix = np.zeros((len(names), len(reference.classes) if reference is not None else 0))
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, (vector, cells) in enumerate(zip(batch["vector"], batch["cells"])):
                total.add_vector(np.asarray(vector, dtype=np.float64))
                with_data += np.asarray(cells, dtype=np.int64)
                if mix_level is not None:
                    mix += np.asarray(batch["mix"][i], dtype=np.float64).reshape(mix.shape)
        total.apply()
        if mix_level is not None and reference is not None:
            overlap = overlaps(mix, with_data, reference)
            deep = choose_layers(overlap, params.min_mix_overlap)
        keep_query_layers(adapted, offset, "input" if auto and step == 0 else record_layers, deep)
        statistics = query_statistics(adapted, offset)
    own = with_data >= params.min_domain_cells
    report = domains_report(params.domain_statistics, params.batch_key, params.batch, params.min_domain_cells)
    report["batches"] = {n: {"cells": int(c), "own_statistics": bool(o)} for n, c, o in zip(names, counts, own)}
    if auto:
        if deep is None:
            deep = np.zeros(len(names), dtype=bool)
            report["auto"] = ("input statistics only: the atlas has no label heads or reference composition to "
                              "compare with")
        record_choice(report, overlap[own], deep[own], reference, params.min_mix_overlap)
    assert statistics is not None  # query_passes ≥ 1
    return FixedDomains(tuple(names), tuple(bool(o) for o in own), offset, report), statistics
