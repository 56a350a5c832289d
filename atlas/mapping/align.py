"""Align a query AnnData to an atlas's feature vocabulary and normalise it as the reference was.

The query's counts must be raw (integers). Features are matched by id (``var_names`` for RNA,
DataFrame columns for the other modalities); query features the atlas does not know are
dropped, reference features the query lacks are zero. A query that covers less than
``min_fraction`` of the reference vocabulary is refused: the frozen model would see a cell
profile it was never trained on and the neighbours would be meaningless.

Where each modality of the query is read from (first match wins):

* ``RNA``: ``adata.layers["counts"]`` if present, else ``adata.X``; feature ids = ``var_names``.
* other modalities (``protein``, ``ATAC``): ``adata.obsm[m]`` or ``adata.obsm[f"{m}_counts"]``,
  a pandas DataFrame whose columns are the feature ids (an unnamed array is refused); a frame of
  sparse columns (``pd.DataFrame.sparse.from_spmatrix``) is read without densifying.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlas.data.normalize import normalize_log1p, tfidf_log1p
from atlas.errors import MappingError  # noqa: F401 (defined there, raised and imported from here)

#: How many unknown query feature names a report lists (the count is always complete).
_REPORT_NAMES = 20


def query_matrix(adata: Any, modality: str) -> tuple[sp.csr_matrix, list[str]] | None:
    """The query's raw count matrix of ``modality`` and its feature ids, or None when absent."""
    if modality == "RNA":
        if adata.n_vars == 0:
            return None
        x = adata.layers["counts"] if "counts" in adata.layers else adata.X
        if x is None:
            return None
        return sp.csr_matrix(x), [str(v) for v in adata.var_names]
    for key in (modality, f"{modality}_counts"):
        if key in adata.obsm:
            value = adata.obsm[key]
            if not isinstance(value, pd.DataFrame):
                raise MappingError(
                    f"query obsm[{key!r}] has no feature names; store it as a pandas DataFrame whose "
                    f"columns are the {modality} feature ids"
                )
            features = [str(c) for c in value.columns]
            if len(value.columns) and all(isinstance(t, pd.SparseDtype) for t in value.dtypes):
                # A sparse frame (e.g. cells × peaks) stays sparse: never densify ATAC.
                return sp.csr_matrix(value.sparse.to_coo(), dtype=np.float32), features
            return sp.csr_matrix(value.to_numpy(dtype=np.float32)), features
    return None


def _holds(adata: Any, modality: str) -> bool:
    if modality == "RNA":
        return adata.n_vars > 0 and ("counts" in adata.layers or adata.X is not None)
    return any(key in adata.obsm for key in (modality, f"{modality}_counts"))


def query_modalities(adata: Any) -> list[str]:
    """Modalities the query holds (``RNA`` / ``protein`` / ``ATAC``), in canonical order.

    Looks at where each would be read from, without converting any matrix."""
    return [m for m in ("RNA", "protein", "ATAC") if _holds(adata, m)]


def atlas_species(atlas: Any) -> str | None:
    """The species recorded in the atlas manifest, else inferred from its RNA vocabulary ids."""
    from atlas.store.vocabulary import detect_namespace, infer_species, normalise_species

    manifest = atlas.manifest
    for section in (manifest, manifest.get("build_config", {}), manifest.get("store", {}), manifest.get("extra", {})):
        if isinstance(section, dict) and section.get("species"):
            return normalise_species(str(section["species"]))
    vocab = atlas.vocabulary.get("RNA")
    if not vocab:
        return None
    ids = pd.Index(vocab)
    return infer_species(ids, detect_namespace("RNA", ids)).species


def _query_species(features: list[str]) -> str | None:
    return _species_of(tuple(features))


@functools.lru_cache(maxsize=64)
def _species_of(features: tuple[str, ...]) -> str | None:
    # Cached: a service sees the same gene list request after request, and inferring the species
    # (string matching over every id) cost ~20 ms of a 1,000-cell request's ~240 ms on one thread.
    from atlas.store.vocabulary import detect_namespace, infer_species

    ids = pd.Index(features)
    return infer_species(ids, detect_namespace("RNA", ids)).species


def _check_raw(csr: sp.csr_matrix, modality: str) -> None:
    """Every stored value must be a finite, non-negative whole number (one pass over the values;
    a NaN or inf anywhere would otherwise poison its cell's normalisation)."""
    values = csr.data
    if not values.size or values.dtype.kind in "iub" and values.min() >= 0:
        return
    finite = np.isfinite(values)
    if not finite.all():
        what = "NaN" if np.isnan(values).any() else "infinite"
        raise MappingError(f"query {modality} values are not raw counts ({what} values found); "
                           "pass the unnormalised counts (e.g. in adata.layers['counts']) with no missing values")
    if values.min() < 0 or not np.array_equal(values, np.round(values)):
        raise MappingError(
            f"query {modality} values are not raw counts (negative or non-integer values found); "
            "pass the unnormalised counts (e.g. in adata.layers['counts'])"
        )


def align_query(adata: Any, atlas: Any, modality: str, min_fraction: float = 0.5,
                *, check_species: bool = True) -> tuple[sp.csr_matrix, dict[str, Any]]:
    """The query's ``modality`` counts as a CSR over the atlas vocabulary (column j = vocabulary id j).

    Returns ``(csr float32 [cells, vocabulary size], report)``; the report holds ``modality``,
    ``n_reference_features``, ``n_query_features``, ``n_present`` (reference features found in the
    query), ``fraction`` (= n_present / n_reference_features), ``n_dropped`` and ``dropped`` (the
    first query features unknown to the atlas) and ``n_duplicates`` (repeated query ids: the first
    is kept). Raises :class:`MappingError` when the query lacks the modality, its values are not
    raw counts, its species differs from the atlas's, or ``fraction < min_fraction``.
    """
    vocab = atlas.vocabulary.get(modality)
    if vocab is None:
        raise MappingError(f"atlas {atlas.version} has no {modality} vocabulary; "
                           f"it knows {sorted(atlas.vocabulary)}")
    found = query_matrix(adata, modality)
    if found is None:
        raise MappingError(f"the query has no {modality} data; see atlas.mapping.align for where it is read from")
    csr, features = found
    _check_raw(csr, modality)
    if check_species and modality == "RNA":
        ref, qry = atlas_species(atlas), _query_species(features)
        if ref and qry and ref != qry:
            raise MappingError(f"the query's genes look {qry} but atlas {atlas.version} is {ref}; "
                               f"map it onto a {qry} atlas (or convert the gene ids to {ref} orthologs)")

    feats = pd.Index(features)
    first = ~feats.duplicated()
    pos = pd.Index(vocab).get_indexer(feats)
    use = (pos >= 0) & first
    n_present = int(use.sum())
    dropped = [f for f, p in zip(features, pos) if p < 0]
    report: dict[str, Any] = {
        "modality": modality,
        "n_reference_features": len(vocab),
        "n_query_features": len(features),
        "n_present": n_present,
        "fraction": n_present / max(len(vocab), 1),
        "n_dropped": len(dropped),
        "dropped": dropped[:_REPORT_NAMES],
        "n_duplicates": int((~first).sum()),
    }
    if report["fraction"] < min_fraction:
        example = ", ".join(vocab[:3])
        raise MappingError(
            f"the query has {n_present} of the atlas's {len(vocab)} {modality} features "
            f"({report['fraction']:.1%} < {min_fraction:.0%} required); use the same feature ids as "
            f"the atlas (e.g. {example}) or lower min_fraction"
        )
    coo = csr.tocoo()
    keep = use[coo.col]
    aligned = sp.csr_matrix(
        (coo.data[keep].astype(np.float32), (coo.row[keep], pos[coo.col[keep]])),
        shape=(csr.shape[0], len(vocab)), dtype=np.float32,
    )
    aligned.sum_duplicates()
    aligned.sort_indices()
    return aligned, report


def normalization_of(atlas: Any, modality: str) -> str:
    """How the reference normalised ``modality`` (``log1p`` unless the build config says otherwise)."""
    data = atlas.manifest.get("build_config", {}).get("data", {}) or {}
    return str((data.get("normalization") or {}).get(modality, "log1p"))


def normalize_aligned(csr: sp.csr_matrix, atlas: Any, modality: str) -> sp.csr_matrix:
    """Normalise aligned counts exactly as the reference pipeline did.

    ``log1p``: library size 1e4 + log1p, the library size taken over the atlas's features only,
    as the reference's was over its stored features. ``tfidf``: TF-IDF with the reference's idf
    stored in the artifact (a query never refits it: its cells would be scaled differently).
    """
    method = normalization_of(atlas, modality)
    out = sp.csr_matrix(csr, dtype=np.float32, copy=True)
    if method == "log1p":
        out.data = normalize_log1p(out.indptr, out.data)
    elif method == "tfidf":
        idf = atlas.idf(modality) if hasattr(atlas, "idf") else None
        if idf is None:
            raise MappingError(
                f"atlas {atlas.version} normalised {modality} with TF-IDF but stores no reference idf "
                "(built by an older version); rebuild the atlas to map queries with this modality"
            )
        out.data = tfidf_log1p(out.indptr, out.indices, out.data, idf)
    elif method != "none":
        raise MappingError(f"atlas {atlas.version} uses unknown normalisation {method!r} for {modality}; "
                           "upgrade the atlas package")
    return out
