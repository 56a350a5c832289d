"""Batch inference: embed every reference (or query) cell with a frozen model via Ray Data.

The dataset's read tasks stream cells from the store; an actor pool (one actor per GPU, or CPU
actors) holds the frozen model, loaded once per actor, and turns each block into embeddings.
The caller consumes the result as a stream (``iter_embeddings``), so the driver never holds the
expression matrix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from atlas.data.collate import table_to_batch
from atlas.data.dataset import make_dataset
from atlas.data.plan import ReadPlan
from atlas.data.reader import read_block
from atlas.models.config import model_from_spec
from atlas.models.recalibrate import DomainStatistics, normalisation_passes
from atlas.train.step import autocast_context


def _load(model_spec: dict[str, Any], state: Any) -> torch.nn.Module:
    if isinstance(state, ray.ObjectRef):  # weights travel once through the object store
        state = ray.get(state)
    model = model_from_spec(model_spec)
    model.load_state_dict(state)
    return model


class Embedder:
    """A Ray Data actor: the frozen model, loaded once, embedding Arrow blocks of cells."""

    def __init__(self, model_spec: dict[str, Any], state: dict[str, torch.Tensor], modalities: tuple[str, ...]):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = _load(model_spec, state).to(self.device).eval()
        self.modalities = modalities

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        batch = {k: v.to(self.device) for k, v in table_to_batch(table, self.modalities).items()}
        with autocast_context(self.device):  # the query's rule too (atlas.mapping.embedding)
            z = self.model.embed(batch)
        z = z.float().cpu().numpy()
        return pa.table({
            "soma_joinid": table.column("soma_joinid"),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1]),
        })


def embed_dataset(
    plan: ReadPlan,
    model_spec: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    batch_size: int = 2048,
    actors: int = 1,
    use_gpu: bool = False,
) -> ray.data.Dataset:
    """Embeddings of the plan's cells: rows ``soma_joinid``, ``embedding`` (fixed-size list).

    ``model_spec`` holds ``config`` (a dict), ``vocab_sizes`` and ``n_domains``.
    """
    state_ref = ray.put({k: v.cpu() for k, v in state.items()})
    return make_dataset(plan).map_batches(
        Embedder,
        fn_constructor_kwargs={"model_spec": model_spec, "state": state_ref, "modalities": plan.modalities},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
    )


def iter_embeddings(ds: ray.data.Dataset) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``(soma_joinid [n], embedding [n, d])`` chunks of an embedding dataset."""
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        emb = table.column("embedding").combine_chunks()
        dim = emb.type.list_size
        yield (
            table.column("soma_joinid").to_numpy(),
            emb.flatten().to_numpy().reshape(-1, dim).astype(np.float32, copy=False),
        )


class StatisticsRecorder:
    """A Ray actor holding the frozen model: records its normalisation layers' inputs per domain
    over the store blocks it is given (read like the datasource reads them) and returns the
    :meth:`DomainStatistics.vector`. The same actors serve every pass; only the weights move."""

    def __init__(self, model_spec: dict[str, Any], state: Any, plan: ReadPlan):
        torch.set_num_threads(1)  # one CPU per actor, as scheduled
        self.model = _load(model_spec, state).eval()  # fp32 on CPU: statistics, not throughput
        self.plan = plan

    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    @torch.inference_mode()
    def record(self, blocks: list) -> np.ndarray:
        stats = DomainStatistics(self.model)
        with stats.recording():
            for block in blocks:
                for table in read_block(self.plan, block):
                    self.model.embed(table_to_batch(table, self.plan.modalities))
        return stats.vector()


def recalibrate(
    plan: ReadPlan,
    model_spec: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    passes: int | None = None,
    actors: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """``state`` with every DomainBatchNorm1d's statistics replaced by the exact per-domain
    statistics of the plan's cells (see :mod:`atlas.models.recalibrate`); ``passes`` over them by
    ``actors`` Ray actors that each read their share of the plan's blocks from the store
    (default: :func:`~atlas.models.recalibrate.normalisation_passes` of the model).
    Returns the new state and, per layer, how many domains were set."""
    model = _load(model_spec, {k: v.cpu() for k, v in state.items()}).eval()
    updated: dict[str, int] = {}
    if not DomainStatistics(model).layers:  # nothing to recalibrate (no domain normalisation)
        return state, updated
    passes = normalisation_passes(model) if passes is None else passes
    blocks = list(plan.blocks)
    n = max(1, min(actors, len(blocks)))
    recorder = ray.remote(StatisticsRecorder).options(num_cpus=1)
    weights = ray.put({k: v.cpu() for k, v in model.state_dict().items()})  # once, shared by every actor
    workers = [recorder.remote(model_spec, weights, plan) for _ in range(n)]
    try:
        for step in range(passes):
            if step:
                weights = ray.put({k: v.cpu() for k, v in model.state_dict().items()})
                ray.get([w.set_state.remote(weights) for w in workers])
            total = DomainStatistics(model)
            for vector in ray.get([w.record.remote(blocks[i::n]) for i, w in enumerate(workers)]):
                total.add_vector(vector)
            updated = total.apply()
    finally:
        for w in workers:
            ray.kill(w)
    return {k: v.clone() for k, v in model.state_dict().items()}, updated
