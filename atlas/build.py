"""Build an atlas: train → embed → index → artifact, from one build config.

``jobs/build_atlas.py`` (``ray job submit``) and ``atlas build`` both call :func:`build_atlas`.
The store version is resolved once and pinned for the whole build; the artifact is assembled in
a staging folder beside ``output`` and renamed into place only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import scipy.sparse as sp
import torch

from atlas.artifact import write_manifest
from atlas.data.arrow import list_column_csr
from atlas.data.dataset import build_plan, make_dataset, vocabulary_sizes
from atlas.data.plan import ReadPlan
from atlas.data.reader import open_experiment
from atlas.data.snapshot import default_location
from atlas.embed import embed_dataset, iter_embeddings, recalibrate
from atlas.index.profile_space import FIT_CELLS, ProfileSpace
from atlas.index.shards import build_hierarchy
from atlas.mapping.heads import read_heads, write_heads
from atlas.models.concerto import embedding_head_weights
from atlas.models.config import ConcertoConfig, config_to_dict
from atlas.names import csr_columns, store_embedding
from atlas.staging import staged_output
from atlas.stopping import rearm
from atlas.store.embeddings import write_embedding
from atlas.store.versions import current_version, is_store
from atlas.train.config import BuildConfig, ConfigError
from atlas.train.trainer import cluster_has_gpus, initial_state, train, uses_labels

DENSE_PROFILE_MAX_FEATURES = 2048
"""Profiles of modalities up to this many features are stored dense (NaN rows = not measured)."""


@dataclass
class BuildSummary:
    """What a build produced and how long each stage took."""

    artifact: str
    atlas_version: str
    cells: int
    store_version: int | None
    seconds: dict[str, float]
    final_loss: float
    train_cells_per_s: float


def init_local_ray(num_workers: int) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (a submitted job), or start a local Ray with enough
    logical CPUs that read tasks and training workers can run side by side."""
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # address="local": a cluster of our own even when a head started with `ray start` runs here
        # (joining it would refuse num_cpus, and RAY_ADDRESS is how a user asks to join one).
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_workers + 2), include_dashboard=False)
    rearm()  # ray.init replaced the SIGTERM handler of `atlas build` with sys.exit


def preflight(build: BuildConfig, uri: str, *, writes_store: bool) -> None:
    """Every check that can fail after training, made before it: a build that trains for hours
    and then stops on a misspelt level or an unwritable folder loses the hours."""
    exp = open_experiment(uri)
    measurements = set(exp.ms.keys())
    for section, names in (("model.modalities", build.model.modalities), ("index.profiles", build.index.profiles)):
        missing = [m for m in names if m not in measurements]
        if missing:
            raise ConfigError(f"{section}: the store has no modality {missing} (it has {sorted(measurements)})")
    if (build.index.profile_space or 0) < 0:
        raise ConfigError(f"index.profile_space must be ≥ 0 (PCA components; 0: none), got {build.index.profile_space}")
    if build.index.label_space == "profiles" and not (build.index.profile_space and "RNA" in build.model.modalities):
        raise ConfigError("index.label_space: profiles needs a profile space: index.profile_space > 0 and RNA "
                          "among model.modalities")
    if build.data.snapshot and build.data.snapshot_dir is None and default_location(uri) is None:
        raise ConfigError(f"data.snapshot: the store {uri} is not a local atlas store folder, so there is no "
                          "default place for the training snapshot; give data.snapshot_dir (a local folder) "
                          "or set data.snapshot: false")
    columns = set(exp.obs.schema.names)
    missing = [c for c in build.index.levels if c not in columns]
    if missing:
        raise ConfigError(f"index.levels: the store's obs has no column(s) {missing}; label columns there: "
                          f"{sorted(c for c in columns if c not in ('soma_joinid', 'obs_id'))}")
    output = Path(build.output).expanduser().resolve()
    parent = next((p for p in (output, *output.parents) if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output: cannot write {output} ({parent} is not writable); choose another folder")
    if writes_store and "://" not in build.store and not os.access(build.store, os.W_OK | os.X_OK):
        raise ConfigError(f"store: {build.store} is not writable, and the build writes its embedding back "
                          "into a new store version; fix the permissions or build from a copy")


def resolve_snapshot(snapshot: bool | None, *, use_gpu: bool, uri: str) -> bool:
    """``data.snapshot`` None: train from a snapshot when training runs on GPUs (a GPU consumes
    cells faster than point reads of the store deliver them; the CPU models do not) and the store
    is a local folder (where the snapshot has its default place)."""
    if snapshot is not None:
        return bool(snapshot)
    return use_gpu and default_location(uri) is not None


def _training_plan(build: BuildConfig, uri: str, log: Callable[[str], None] = print) -> ReadPlan:
    # Enough read blocks that the streaming split can balance every worker (≥ 8 blocks each).
    # Label heads learn from the index levels' labels: the cells carry their codes.
    levels = tuple(build.index.levels) if uses_labels(build) else ()
    plan = build_plan(uri, build.data, label_levels=levels, log=lambda m: log(f"[build] {m}"))
    per_block = max(build.data.batch_size, math.ceil(plan.n_cells / (8 * build.scaling.num_workers)))
    if per_block < build.data.block_size:
        plan = build_plan(uri, dataclasses.replace(build.data, block_size=per_block), label_levels=levels,
                          log=lambda m: log(f"[build] {m}"))
    return plan


def _vocabulary(uri: str, modalities: tuple[str, ...]) -> dict[str, list[str]]:
    exp = open_experiment(uri)
    out = {}
    for m in modalities:
        var = exp.ms[m].var.read(column_names=["soma_joinid", "var_id"]).concat().to_pandas()
        out[m] = var.sort_values("soma_joinid")["var_id"].astype(str).tolist()
    return out


def _obs_columns(uri: str, joinids: np.ndarray, columns: list[str]) -> pd.DataFrame:
    exp = open_experiment(uri)
    obs = exp.obs.read(coords=(np.sort(joinids),), column_names=["soma_joinid", *columns]).concat().to_pandas()
    return obs.set_index("soma_joinid").loc[joinids]


def _normalised_blocks(build: BuildConfig, uri: str, modality: str, joinids: np.ndarray, domain_names,
                       n_features: int) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
    """``(rows into joinids, normalised CSR of those cells)`` per block, streamed by Ray Data."""
    plan = build_plan(uri, dataclasses.replace(build.data, modalities=(modality,), shuffle=False, single_domain=False),
                      joinids=joinids, domain_names=domain_names)
    position = pd.Series(np.arange(joinids.size), index=joinids)
    ids_column, values_column = csr_columns(modality)
    for table in make_dataset(plan).iter_batches(batch_size=None, batch_format="pyarrow"):
        indptr, ids = list_column_csr(table.column(ids_column))
        _, values = list_column_csr(table.column(values_column))
        cell_rows = position.loc[table.column("soma_joinid").to_numpy()].to_numpy()
        yield cell_rows, sp.csr_matrix((values, ids, indptr), shape=(cell_rows.size, n_features), dtype=np.float32)


def _profiles(build: BuildConfig, uri: str, joinids: np.ndarray, domain_names) -> dict[str, tuple[list[str], Any]]:
    """Normalised values of every profile modality for the reference cells, streamed by Ray Data."""
    out = {}
    vocab = _vocabulary(uri, tuple(build.index.profiles))
    for m in build.index.profiles:
        n_features = len(vocab[m])
        rows, blocks = [], []
        for cell_rows, block in _normalised_blocks(build, uri, m, joinids, domain_names, n_features):
            rows.append(cell_rows)
            blocks.append(block)
        order = np.argsort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
        matrix = (sp.vstack(blocks, format="csr")[order] if blocks
                  else sp.csr_matrix((joinids.size, n_features), dtype=np.float32))
        if matrix.shape[0] != joinids.size:
            raise RuntimeError(f"read {matrix.shape[0]} {m} rows for {joinids.size} reference cells")
        if n_features <= DENSE_PROFILE_MAX_FEATURES:
            dense = matrix.toarray()
            dense[np.diff(matrix.indptr) == 0] = np.nan  # not measured, not "all zero"
            out[m] = (vocab[m], dense)
        else:
            out[m] = (vocab[m], matrix)
    return out


def _profile_space(build: BuildConfig, uri: str, joinids: np.ndarray, domain_names,
                   log: Callable[[str], None]) -> tuple[ProfileSpace, np.ndarray]:
    """The PCA of the reference's RNA (fitted on up to ``FIT_CELLS`` cells) and every reference
    cell's coordinates in it (rows: ``joinids``); two streamed passes, nothing cells × genes held whole."""
    n_features = len(_vocabulary(uri, ("RNA",))["RNA"])
    rng = np.random.default_rng(build.train.seed)
    fit_ids = np.sort(rng.choice(joinids, FIT_CELLS, replace=False)) if joinids.size > FIT_CELLS else joinids
    blocks = [b for _, b in _normalised_blocks(build, uri, "RNA", fit_ids, domain_names, n_features)]
    space = ProfileSpace.fit(sp.vstack(blocks, format="csr"), "RNA", n_components=build.index.profile_space or 0,
                             seed=build.train.seed)
    coords = np.zeros((joinids.size, space.components.shape[0]), np.float32)
    for rows, block in _normalised_blocks(build, uri, "RNA", joinids, domain_names, n_features):
        coords[rows] = space.project(block)
    log(f"[build] profile space: PCA of RNA, {space.components.shape[0]} components fitted on {fit_ids.size:,} cells")
    return space, coords


def build_atlas(build: BuildConfig, *, resume: bool = False, overwrite: bool = False,
                log: Callable[[str], None] = print) -> BuildSummary:
    """Run a whole build on the connected Ray cluster (``ray.init()`` is called if needed)."""
    output = Path(build.output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} already holds an atlas; choose another output or pass --overwrite")
    version = current_version(build.store) if is_store(build.store) else None
    uri = version.uri if version else build.store
    modalities = tuple(build.model.modalities)
    preflight(build, uri, writes_store=version is not None)
    if not ray.is_initialized():
        init_local_ray(build.scaling.num_workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if build.data.snapshot is None:  # resolved here, where the GPUs are known: the manifest says what ran
        use_gpu = build.scaling.use_gpu if build.scaling.use_gpu is not None else cluster_has_gpus()
        snapshot = resolve_snapshot(None, use_gpu=bool(use_gpu), uri=uri)
        build = dataclasses.replace(build, data=dataclasses.replace(build.data, snapshot=snapshot))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = _training_plan(build, uri, log)
    seconds["plan"] = time.perf_counter() - t0  # with data.snapshot: includes writing it the first time
    vocab_sizes = vocabulary_sizes(uri, modalities)
    log(f"[build] store {build.store} version {version.version if version else '-'}: "
        f"{plan.n_cells:,} cells, {len(plan.domain_names)} domains, modalities {list(modalities)}, "
        f"{len(plan.blocks)} read blocks, {build.scaling.num_workers} worker(s)")

    if plan.label_levels:
        described = ", ".join(f"{lv} ({len(c)} classes)" for lv, c in zip(plan.label_levels, plan.label_classes))
        log(f"[build] label heads on {described}")
    initial = initial_state(build, plan, vocab_sizes, len(plan.domain_names))
    result = train(build, plan, vocab_sizes, initial=initial, resume=resume)
    seconds["train"] = result.seconds
    epochs = result.history.get("epochs", [])
    log(f"[build] trained in {result.seconds:.1f} s; final loss {epochs[-1]['loss']:.4f}" if epochs else "[build] trained")

    t = time.perf_counter()
    model_spec: dict[str, Any] = {"config": config_to_dict(build.model), "vocab_sizes": vocab_sizes,
                                  "n_domains": len(plan.domain_names)}
    if plan.label_levels:
        model_spec["heads"] = {"levels": list(plan.label_levels), "classes": [list(c) for c in plan.label_classes]}
    embed_plan = build_plan(uri, dataclasses.replace(build.data, shuffle=False, single_domain=False),
                            domain_names=plan.domain_names)
    use_gpu = build.scaling.use_gpu if build.scaling.use_gpu is not None else cluster_has_gpus()
    # Training leaves moving averages of the normalisation statistics, merged across workers;
    # the reference is embedded (and queries later normalised) with the trained model's exact ones.
    model_state, recalibrated = recalibrate(embed_plan, model_spec, result.model_state,
                                            actors=build.index.embed_actors)
    seconds["recalibrate"] = time.perf_counter() - t
    log(f"[build] exact normalisation statistics of {sum(recalibrated.values())} (layer, domain) pairs "
        f"in {seconds['recalibrate']:.1f} s")
    t = time.perf_counter()
    chunks = list(iter_embeddings(embed_dataset(embed_plan, model_spec, model_state,
                                                batch_size=build.index.embed_batch_size,
                                                actors=build.index.embed_actors, use_gpu=use_gpu)))
    joinids = np.concatenate([c[0] for c in chunks])
    embeddings = np.concatenate([c[1] for c in chunks])
    order = np.argsort(joinids)
    joinids, embeddings = joinids[order], embeddings[order]
    seconds["embed"] = time.perf_counter() - t
    log(f"[build] embedded {joinids.size:,} reference cells in {seconds['embed']:.1f} s")

    atlas_version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    embedding_version = None
    if version is not None:
        written = write_embedding(
            build.store, modalities[0], store_embedding(build.name),
            ((joinids[i : i + 65536], embeddings[i : i + 65536]) for i in range(0, joinids.size, 65536)),
            {"atlas_version": atlas_version, "model": build.model.model, "modalities": list(modalities),
             "built_from_store_version": version.version},
        )
        embedding_version = written.version
        log(f"[build] embeddings written to the store as version {written.version} "
            f"({modalities[0]}.obsm['{store_embedding(build.name)}'])")

    t = time.perf_counter()
    levels = list(build.index.levels)
    obs = _obs_columns(uri, joinids, ["dataset_id", *levels])
    profiles = _profiles(build, uri, joinids, plan.domain_names) if build.index.profiles else None
    space, profile_vectors = None, None
    wants_space = build.index.label_space == "profiles"  # "auto" was resolved by the config
    if (profiles or wants_space) and build.index.profile_space and "RNA" in modalities:
        space, coords = _profile_space(build, uri, joinids, plan.domain_names, log)
        profile_vectors = space.vectors(embeddings, coords)
    # Labels voted in the profile space: every shard indexes those vectors (no second index needed).
    in_profile_space = space is not None and wants_space
    index_vectors = profile_vectors if in_profile_space and profile_vectors is not None else embeddings
    with staged_output(output) as staging:
        layout = build_hierarchy(
            index_vectors, joinids, {lv: obs[lv].to_numpy() for lv in levels}, levels, profiles,
            obs["dataset_id"].to_numpy(), index_kind=build.index.kind, exact_below=build.index.exact_below,
            use_gpu=use_gpu or None, n_hash_shards=build.index.hash_shards, out_dir=staging / "shards",
            seed=build.train.seed, profile_vectors=None if in_profile_space else profile_vectors,
        )
        seconds["index"] = time.perf_counter() - t
        log(f"[build] index: {layout.mode} layout, {len(layout.shard_names())} shard(s) in {seconds['index']:.1f} s")
        heads = None
        if plan.label_levels:
            assert isinstance(build.model, ConcertoConfig)  # uses_labels: only Concerto has heads
            weights = embedding_head_weights(build.model, model_state, len(plan.label_levels))
            model_spec["heads"] = write_heads(staging, weights, plan.label_levels, plan.label_classes)
            heads = read_heads(staging, {"model": model_spec})
        mapping = _calibrate(build, layout, staging / "shards", index_vectors, joinids, obs, levels, log, heads,
                             head_inputs=embeddings if in_profile_space else None)
        if space is not None:
            mapping["profile_space"] = {**space.save(staging), "labels": in_profile_space}
        torch.save(model_state, staging / "model.pt")
        seconds["total"] = time.perf_counter() - t0
        store_record = {"uri": str(Path(uri).resolve()) if "://" not in uri else uri,
                        "version": version.version if version else None,
                        "committed_at": _committed_at(build.store, version),
                        "embedding_version": embedding_version}
        manifest = write_manifest(
            staging,
            build_config=build.to_dict(),
            model={**model_spec, "kind": build.model.model, "domain_names": list(plan.domain_names),
                   "weights": "model.pt"},
            vocabulary=_vocabulary(uri, tuple(sorted(set(modalities) | set(build.index.profiles)))),
            store=store_record,
            metrics={"epochs": epochs, "seconds": seconds, "cells": int(joinids.size),
                     "train_cells_per_s": epochs[-1]["cells_per_s"] if epochs else None},
            extra={"history": result.history, "run_path": result.run_path},
            atlas_version=atlas_version,
            mapping=mapping,
            species=_species(uri, modalities),
            idf={m: v for m, v in plan.idf.items() if m in modalities},
        )
    summary = BuildSummary(
        artifact=str(output), atlas_version=manifest["atlas_version"], cells=int(joinids.size),
        store_version=version.version if version else None, seconds=seconds,
        final_loss=float(epochs[-1]["loss"]) if epochs else float("nan"),
        train_cells_per_s=float(epochs[-1]["cells_per_s"]) if epochs else float("nan"),
    )
    log(f"[build] atlas {summary.atlas_version} written to {output} in {seconds['total']:.1f} s")
    return summary


def _calibrate(build: BuildConfig, layout, shards_dir: Path, embeddings: np.ndarray, joinids: np.ndarray,
               obs: pd.DataFrame, levels: list[str], log: Callable[[str], None], heads: Any = None,
               head_inputs: np.ndarray | None = None) -> dict[str, Any]:
    """Unknown-rejection thresholds from reference cells mapped leave-one-out (empty: no levels)."""
    if not levels or build.index.calibration_cells <= 0:
        return {}
    from atlas.mapping.calibrate import calibrate_thresholds
    from atlas.mapping.search import LocalSearcher, ShardFolder

    t = time.perf_counter()
    labels = {lv: obs[lv].fillna("").astype(str).to_numpy() for lv in levels}
    mapping = calibrate_thresholds(
        embeddings, joinids, labels, LocalSearcher(ShardFolder(shards_dir)), layout, levels,
        rejection_rate=build.index.rejection_rate, max_cells=build.index.calibration_cells,
        seed=build.train.seed, heads=heads, vote_balance=build.index.vote_balance or 0.0,
        # Leaving whole types out of the reference (benchmarks/validate_heads.py --tasks rejection):
        # the distance to the reference sharpened the confidence in the teacher's embedding (mean
        # AUROC 0.900 vs 0.871 for the head probability alone) but blurred it in the teacher +
        # student one (0.798 vs 0.859 for vote share x head probability), where the student half
        # keeps an unseen type close to its nearest known one. The normalised teacher keeps the
        # term as the teacher did (not validated separately for rejection).
        relative_similarity=getattr(build.model, "embedding", "teacher") != "teacher+student",
        head_inputs=head_inputs,
    )
    shown = ", ".join(f"{lv} {v:.3f}" for lv, v in mapping["thresholds"].items() if v is not None)
    acc = ", ".join(f"{lv} {v:.3f}" for lv, v in mapping["loo_accuracy"].items() if v is not None)
    log(f"[build] unknown thresholds ({mapping['n_cells']:,} held-out reference cells, "
        f"{build.index.rejection_rate:.0%} rejected): {shown}; leave-one-out accuracy {acc} "
        f"({time.perf_counter() - t:.1f} s)")
    return mapping


def _species(uri: str, modalities: tuple[str, ...]) -> str | None:
    exp = open_experiment(uri)
    for m in ("RNA", *modalities):
        if m in exp.ms and exp.ms[m].metadata.get("species"):
            return str(exp.ms[m].metadata["species"])
    return None


def _committed_at(store: str, version) -> float | None:
    if version is None:
        return None
    from atlas.store.versions import read_record

    for entry in read_record(store)["history"]:
        if entry["version"] == version.version:
            return entry.get("committed_at")
    return None
