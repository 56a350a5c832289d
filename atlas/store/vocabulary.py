"""The feature vocabulary: id namespaces and species of a measurement's features.

Each measurement's ``var`` is its vocabulary: one row per feature, ``var_id`` as given by the
source, and a ``soma_joinid`` that never changes (models index embedding tables by it). A
measurement records which species and which id namespace its ids come from
(``ms.metadata["species"]``, ``ms.metadata["id_namespace"]``), because ``Cd4`` (mouse) and
``CD4`` (human), or a symbol and an Ensembl id, must never be silently merged or kept apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlas.store.versions import StoreError

SPECIES = ("human", "mouse")
NAMESPACES = ("symbol", "ensembl", "antibody", "peak")

_ENSEMBL = re.compile(r"^ENS([A-Z]{3})?G\d{6,}")
_GENOME_PREFIX = re.compile(r"^(hg19|hg38|GRCh37|GRCh38|mm9|mm10|mm39|GRCm38|GRCm39)[_-]", re.IGNORECASE)
_GENOMES = {
    "hg19": "human", "hg38": "human", "grch37": "human", "grch38": "human",
    "mm9": "mouse", "mm10": "mouse", "mm39": "mouse", "grcm38": "mouse", "grcm39": "mouse",
}


@dataclass(frozen=True)
class SpeciesCall:
    """A species decision and the reason, for the ingest's report."""

    species: str | None
    """``human``, ``mouse`` or None when the ids do not tell."""
    reason: str


def normalise_species(value: str) -> str | None:
    """Map common spellings (``Homo sapiens``, ``Mus musculus``, ``hs``) to ``human``/``mouse``."""
    v = value.strip().lower()
    if v in ("human", "homo sapiens", "hs", "hsapiens", "h. sapiens") or v in ("grch38", "hg38", "hg19"):
        return "human"
    if v in ("mouse", "mus musculus", "mm", "mmusculus", "m. musculus") or v in ("mm10", "grcm38", "grcm39"):
        return "mouse"
    return None


def species_from_genome(genomes: np.ndarray) -> str | None:
    """Species of a 10x file from its ``genome`` field (e.g. ``GRCh38``), if unambiguous."""
    found = {_GENOMES.get(str(g).lower()) for g in set(genomes)} - {None}
    return found.pop() if len(found) == 1 else None


def detect_namespace(modality: str, feature_ids: pd.Index) -> str:
    """Id namespace of a modality's features: antibody / peak by modality, Ensembl by prefix."""
    if modality == "protein":
        return "antibody"
    if modality == "atac":
        return "peak"
    ids = pd.Series(np.asarray(feature_ids, dtype=str))
    ensembl = ids.str.match(_ENSEMBL.pattern).to_numpy().mean() if len(ids) else 0.0
    return "ensembl" if ensembl >= 0.5 else "symbol"


def infer_species(feature_ids: pd.Index, namespace: str) -> SpeciesCall:
    """Infer the species from gene ids.

    Ensembl ids decide by prefix (``ENSG`` human, ``ENSMUSG`` mouse). Symbols decide by case:
    human symbols are all capitals (``GAD1``), mouse symbols capitalise the first letter only
    (``Gad1``). A genome prefix (``hg19_``, ``mm10_``) decides outright. Antibody and peak names
    do not tell the species.
    """
    ids = pd.Series(np.asarray(feature_ids, dtype=str))
    if namespace in ("antibody", "peak"):
        return SpeciesCall(None, f"{namespace} names do not tell the species")
    prefixes = ids.str.extract(_GENOME_PREFIX.pattern, flags=re.IGNORECASE)[0].dropna()
    if len(prefixes) > len(ids) / 2:
        genome = prefixes.str.lower().mode().iloc[0]
        return SpeciesCall(_GENOMES[genome], f"{_GENOMES[genome]} (ids prefixed with genome {genome})")
    if namespace == "ensembl":
        human = int(ids.str.startswith("ENSG").sum())
        mouse = int(ids.str.startswith("ENSMUSG").sum())
        if human > mouse:
            return SpeciesCall("human", f"human ({human} ENSG Ensembl ids)")
        if mouse > human:
            return SpeciesCall("mouse", f"mouse ({mouse} ENSMUSG Ensembl ids)")
        return SpeciesCall(None, "Ensembl ids are neither ENSG (human) nor ENSMUSG (mouse)")
    stripped = ids.str.replace(_GENOME_PREFIX.pattern, "", regex=True, flags=re.IGNORECASE)
    lettered = stripped[stripped.str.match(r"^[A-Za-z]").to_numpy()]
    if len(lettered) == 0:
        return SpeciesCall(None, "no gene symbols start with a letter")
    upper = (lettered == lettered.str.upper()).to_numpy().mean()
    title = (lettered.str.match(r"^[A-Z][a-z0-9.\-]*[a-z][a-z0-9.\-]*$")).to_numpy().mean()
    if upper >= 0.6:
        return SpeciesCall("human", f"human ({upper:.0%} of {len(lettered)} gene symbols are all capitals)")
    if title >= 0.6:
        return SpeciesCall("mouse", f"mouse ({title:.0%} of {len(lettered)} gene symbols capitalise the first letter only)")
    return SpeciesCall(None, f"gene symbols are ambiguous ({upper:.0%} all capitals, {title:.0%} first-letter capitals)")


def check_compatible(measurement: str, existing: dict[str, str], species: str, namespace: str) -> None:
    """Refuse to mix species or id namespaces in one measurement."""
    old_species = existing.get("species")
    if old_species and old_species != species:
        raise StoreError(
            f"the store's {measurement} measurement holds {old_species} features but this dataset is {species}; "
            f"mixing species in one measurement is refused: ingest it into another store "
            f"(or pass --species {old_species} if the species was mis-inferred)"
        )
    old_ns = existing.get("id_namespace")
    if old_ns and old_ns != namespace:
        raise StoreError(
            f"the store's {measurement} measurement uses {old_ns} ids but this dataset uses {namespace} ids; "
            f"convert the feature ids to {old_ns} before ingesting (they would never match otherwise)"
        )
