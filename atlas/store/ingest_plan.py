"""What ``atlas ingest`` decides before it writes anything: the source's parts (one per
modality), the store's current state, species, the cells kept and their obs rows. Every check
that can refuse a source lives here or in :mod:`atlas.store.validate`; :mod:`atlas.store.ingest`
then writes (a bad source never starts a write)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlas.store import versions
from atlas.store.sources import MODALITIES, Modality, Source, open_source
from atlas.store.validate import MatrixScan, as_strings
from atlas.store.versions import StoreError
from atlas.store.vocabulary import detect_namespace, infer_species, normalise_species

OBS_FIXED = ("obs_id", "cell_id", "dataset_id", "batch")
"""obs columns every cell has; label levels follow them."""
DATASETS_KEY = "atlas_datasets"
"""Experiment metadata key: JSON list of the datasets ingested, one dict each."""


@dataclass
class Part:
    """One modality of the dataset being ingested."""

    measurement: str
    modality: Modality
    namespace: str
    scan: MatrixScan | None = None
    row_pos: np.ndarray | None = None
    """Position of each matrix row in the dataset's (primary) cell order."""

    @property
    def row_nonzero(self) -> np.ndarray:
        """The scan's non-zero values per row; the matrix must have been scanned."""
        if self.scan is None:
            raise RuntimeError(f"{self.measurement}: the count matrix has not been scanned yet")
        return self.scan.row_nonzero


@dataclass
class StoreState:
    """What the current version says, for the checks (empty for a new store)."""

    exists: bool = False
    datasets: list[dict] = field(default_factory=list)
    obs_columns: list[str] = field(default_factory=list)
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    """measurement → {"species", "id_namespace", "features"}."""

    @property
    def label_levels(self) -> list[str]:
        return [c for c in self.obs_columns if c not in OBS_FIXED and c != "soma_joinid"]


def read_store_state(store: Path) -> StoreState:
    """Datasets, obs columns and measurement metadata of a store's current version."""
    if not versions.is_store(store):
        return StoreState()
    import tiledbsoma as soma

    uri = versions.current_version(store).uri
    with soma.Experiment.open(uri) as exp:
        datasets = json.loads(exp.metadata.get(DATASETS_KEY, "[]"))
        measurements = {}
        for name in exp.ms.keys():
            ms = exp.ms[name]
            measurements[name] = {
                "species": ms.metadata.get("species"),
                "id_namespace": ms.metadata.get("id_namespace"),
                "features": int(ms.var.count),
            }
        return StoreState(True, datasets, list(exp.obs.schema.names), measurements)


def check_modality(name: str, option: str) -> str:
    key = str(name).lower()
    if key not in MODALITIES:
        raise StoreError(f"{option}: unknown modality '{name}'; use one of {', '.join(MODALITIES)}")
    return key


def default_dataset_id(source: Any) -> str:
    if not isinstance(source, (str, os.PathLike)):
        raise StoreError("an in-memory AnnData has no file name to name the dataset; pass dataset_id=")
    name = Path(source).name
    for suffix in (".h5ad", ".zarr", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_parts(src: Source, modality: str, paired: dict, obsm_modalities: dict,
                   tenx_feature_ids: str, opened: list[Source]) -> list[Part]:
    modalities = [src.modality(modality)]
    for name, key in obsm_modalities.items():
        modalities.append(src.obsm_modality(name, key))
    for name, path in paired.items():
        with quiet():
            other = open_source(path, tenx_feature_ids=tenx_feature_ids, modality=name)
        opened.append(other)
        modalities.append(other.modality(name))
    names = [m.name for m in modalities]
    for name in set(names):
        if names.count(name) > 1:
            raise StoreError(f"modality {name} is given {names.count(name)} times (--modality, --paired, "
                             "--obsm-modality); give each modality once")
    return [Part(MODALITIES[m.name], m, detect_namespace(m.name, m.feature_ids)) for m in modalities]


def batch_values(src: Source, batch_key: str | None, dataset_id: str) -> np.ndarray:
    if batch_key is None:
        return np.full(len(src.obs), dataset_id, dtype=object)
    values = as_strings(src.obs[batch_key])
    missing = int((values == "").sum())
    if missing:
        raise StoreError(f"--batch-key {batch_key}: {missing} cells have no batch value; fill them in "
                         "or choose another column")
    return values


def decide_species(parts: list[Part], given: str | None, state: StoreState,
                    say: Callable[[str], None]) -> str:
    if given is not None:
        species = normalise_species(given)
        if species is None:
            raise StoreError(f"--species {given}: unknown species; use human or mouse")
        say(f"species: {species} (given)")
        return species
    calls = {p.measurement: infer_species(p.modality.feature_ids, p.namespace) for p in parts}
    hints = {h for p in parts if (h := p.modality.species_hint) is not None}
    found = {c.species for c in calls.values() if c.species} | hints
    if len(found) > 1:
        reasons = "; ".join(f"{ms}: {c.reason}" for ms, c in calls.items())
        raise StoreError(f"the modalities disagree on the species ({reasons}); pass --species human|mouse")
    if found:
        species = found.pop()
        reasons = "; ".join(f"{ms}: {c.reason}" for ms, c in calls.items() if c.species)
        say(f"species: {species} (inferred; {reasons or 'named by the source'}); pass --species to override")
        return species
    stored = {s for p in parts if (s := state.measurements.get(p.measurement, {}).get("species")) is not None}
    if len(stored) == 1:
        species = stored.pop()
        say(f"species: {species} (as the store's {', '.join(p.measurement for p in parts)} measurement; "
            f"{'; '.join(c.reason for c in calls.values())}); pass --species to override")
        return species
    reasons = "; ".join(c.reason for c in calls.values())
    raise StoreError(f"cannot tell the species ({reasons}); pass --species human or --species mouse")


def cells_to_keep(src: Source, parts: list[Part], drop_empty: bool, say: Callable[[str], None]) -> np.ndarray:
    """Cells with at least one non-zero count in some modality (in the source's cell order)."""
    nonzero: np.ndarray = np.zeros(len(src.obs), dtype=np.int64)
    for part in parts:
        np.add.at(nonzero, part.row_pos, part.row_nonzero)
    empty = nonzero == 0
    n_empty = int(empty.sum())
    if n_empty == len(src.obs):
        raise StoreError(f"{src.path}: all {n_empty} cells have zero counts; check that X holds the counts")
    if n_empty and not drop_empty:
        examples = ", ".join(map(repr, src.obs.index[empty][:3]))
        raise StoreError(f"{src.path}: {n_empty} cells have zero counts in every modality (e.g. {examples}); "
                         "filter them out, or drop --refuse-empty-cells to have them dropped")
    if n_empty:
        say(f"dropped {n_empty} cells with zero counts in every modality")
    if len(parts) > 1:
        for part in parts:
            absent = int(((part.row_nonzero == 0) & ~empty[part.row_pos]).sum())
            if absent:
                say(f"{absent} cells have no {part.measurement} counts: stored without {part.measurement}")
    return ~empty


def obs_table(src: Source, keep: np.ndarray, dataset_id: str, batch: np.ndarray,
               label_keys: dict[str, str], state: StoreState, unlabeled: tuple[str, ...] = ()) -> pd.DataFrame:
    cell_ids = src.obs.index[keep].astype(str).to_numpy(dtype=object)
    obs_ids = np.array([f"{dataset_id}:{c}" for c in cell_ids], dtype=object)
    columns: dict[str, np.ndarray] = {
        "obs_id": obs_ids,
        "cell_id": cell_ids,
        "dataset_id": np.full(len(cell_ids), dataset_id, dtype=object),
        "batch": batch[keep],
    }
    levels = state.label_levels + [lv for lv in label_keys if lv not in state.label_levels]
    for level in levels:
        if level in label_keys:
            values = as_strings(src.obs[label_keys[level]])[keep]
            if unlabeled:
                values = np.where(np.isin(values, list(unlabeled)), "", values).astype(object)
            columns[level] = values
        else:
            columns[level] = np.full(len(cell_ids), "", dtype=object)  # this dataset has no such label
    obs = pd.DataFrame(columns, index=pd.Index(obs_ids))
    obs.index.name = None
    return obs


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings that say nothing to an atlas user (anndata/tiledbsoma internals)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
