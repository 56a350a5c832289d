"""The demo's dataset: the shared file when there is one, else rebuilt from its public sources.

``pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad`` (6,855 cells × 4,000 genes, 14
antibodies, manual-gating labels) is made of public files only:

* RNA and protein counts: the 10x Genomics ``pbmc_10k_protein_v3`` run (CC BY 4.0) as filtered
  by the totalVI authors (4,000 highly variable genes), ``data/raw_data/pbmc10k_harmo_rna.csv.gz``
  and ``pbmc10k_harmo_pro.csv.gz`` of YosefLab/totalVI_reproducibility;
* labels: ADTnorm's demo data (yezhengSTAT/ADTnorm, GPL>=3), ``data/cell_x_adt.rda`` (raw counts
  of 9 antibodies, one row per cell of 13 studies) and ``data/cell_x_feature.rda`` (the same rows:
  ``study_name``, ``cell_type_l1``, ``cell_type_l2`` from manual gating, ...). A pbmc10k cell takes
  the labels of the one ``10X_pbmc_10k`` row whose 9 raw antibody counts equal its own; a cell
  with no such row, or with several, or sharing its 9 counts with another pbmc10k cell, has none
  (NaN). ``'undefined'`` is ADTnorm's own label for cells the gating left out.

When the shared folder lacks the file (a fresh clone), :func:`demo_dataset` downloads those four
files from URLs pinned to commits, rebuilds the AnnData exactly as the shared file was built, and
keeps it only if its content fingerprint (:func:`fingerprint_parts`) equals the shared file's,
:data:`EXPECTED_PARTS`. The remote files have no published checksums, so the fingerprint of the
rebuilt content is the check; the sha256 of each raw file is recorded in the cache's
``manifest.json`` after the first verified build, and a raw file that no longer matches it is
discarded and fetched again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from atlas.artifact import file_sha256
from atlas.errors import AtlasError
from atlas.staging import staged_file

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"

TOTALVI_COMMIT = "27d65a9c49182f39df0c4325249bc7dc8e663dd0"
ADTNORM_COMMIT = "142ac08274083a91bf27a8c437042ad2447a4f5f"
TOTALVI_BASE = f"https://raw.githubusercontent.com/YosefLab/totalVI_reproducibility/{TOTALVI_COMMIT}/data/raw_data"
ADTNORM_BASE = f"https://raw.githubusercontent.com/yezhengSTAT/ADTnorm/{ADTNORM_COMMIT}/data"
RNA_CSV, PROTEIN_CSV = "pbmc10k_harmo_rna.csv.gz", "pbmc10k_harmo_pro.csv.gz"
ADT_RDA, FEATURE_RDA = "cell_x_adt.rda", "cell_x_feature.rda"
SOURCES = {
    RNA_CSV: f"{TOTALVI_BASE}/{RNA_CSV}",
    PROTEIN_CSV: f"{TOTALVI_BASE}/{PROTEIN_CSV}",
    ADT_RDA: f"{ADTNORM_BASE}/{ADT_RDA}",
    FEATURE_RDA: f"{ADTNORM_BASE}/{FEATURE_RDA}",
}
# A folder (or file:// URL) holding the four files under their own names, used instead of GitHub.
MIRROR_ENV = "ATLAS_DEMO_MIRROR"
CACHE_ENV = "ATLAS_CACHE"

ADTNORM_STUDY = "10X_pbmc_10k"
# ADTnorm's antibody column → the pbmc10k protein the join compares it with.
JOIN_MARKERS = {
    "CD3": "CD3_TotalSeqB", "CD4": "CD4_TotalSeqB", "CD8": "CD8a_TotalSeqB", "CD14": "CD14_TotalSeqB",
    "CD19": "CD19_TotalSeqB", "CD25": "CD25_TotalSeqB", "CD45RA": "CD45RA_TotalSeqB",
    "CD56": "CD56_TotalSeqB", "CD127": "CD127_TotalSeqB",
}
LABELS = ("cell_type_l1", "cell_type_l2")
BATCH = "pbmc10k_v3"
SOURCE_NOTE = (
    "GitHub YosefLab/totalVI_reproducibility @27d65a9c49182f39df0c4325249bc7dc8e663dd0 "
    "data/raw_data/pbmc10k_harmo_rna.csv.gz, pbmc10k_harmo_pro.csv.gz, pbmc5k_harmo_rna.csv.gz "
    "(10x Genomics pbmc_10k_protein_v3 / pbmc_5k_protein_v3, CC BY 4.0; filtered by totalVI authors, "
    "4000 HVGs); no cell-type labels; 5k protein file absent in snapshot | labels: ADTnorm "
    "(yezhengSTAT/ADTnorm@142ac08 data/cell_x_feature.rda, GPL>=3) study 10X_pbmc_10k cell_type_l1/l2 "
    "(manual gating on ADT), joined by exact match of 9 raw ADT counts "
    "(CD3,CD4,CD8a,CD14,CD19,CD25,CD45RA,CD56,CD127); unmatched/ambiguous -> NaN"
)  # the shared file's uns['source'], word for word

# What the content fingerprint covers, in this order; see fingerprint_parts.
PARTS = ("obs_names", "var_names", "X", "protein_counts", "cell_type_l1", "cell_type_l2")
# Computed with fingerprint_parts(anndata.read_h5ad(<shared folder>/PBMC10K)) on the shared file
# (6,855 × 4,000, float32 CSR, 2,518,605 stored counts; uns['source'] above), once, when this
# module was written; the tests recompute them from the shared file and from a rebuild.
EXPECTED_PARTS = {
    "obs_names": "0160a2e1c3b01979c204f13be213778ff46cb4aa31a01980844c4ada2ff2bb95",
    "var_names": "44de034c800dc3d7a223cc949699da67597aad6609170a2400cdffa671d0195e",
    "X": "909f18fe304db5704294112950efa97d3d35223d12df2e4cd464a1dbf4e393f6",
    "protein_counts": "792007ce7901a84bc05dc9c7933df5e7f5536009b879d15f6633f78b139eeb68",
    "cell_type_l1": "6c10d6c6bb577c815077d2fb62543f77a8a16e9b5755d353d450b033186628b8",
    "cell_type_l2": "6a180c8a6843ba1e1275f4c8fec8363632382921d5688ad4693f98fa41d6753b",
}
DESCRIBE = {
    "obs_names": "the cells (barcodes and order)",
    "var_names": "the genes (names and order)",
    "X": "the RNA counts",
    "protein_counts": "the protein counts (antibody names and values)",
    "cell_type_l1": "the cell_type_l1 labels",
    "cell_type_l2": "the cell_type_l2 labels",
}


def fingerprint(parts: dict[str, str]) -> str:
    """One sha256 over the parts' digests, ``"name=digest\\n"`` in :data:`PARTS` order."""
    return hashlib.sha256("".join(f"{k}={parts[k]}\n" for k in PARTS).encode()).hexdigest()


EXPECTED_FINGERPRINT = fingerprint(EXPECTED_PARTS)  # 03431c496729a0ce25f9ab13f33e2b82fbf86855a0662ed706ec3ae95fadcd4d


def demo_cache_dir() -> Path:
    """``$ATLAS_CACHE/demo``, else ``$XDG_CACHE_HOME/atlas/demo``, else ``~/.cache/atlas/demo``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "demo"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlas" / "demo"


def source_urls(mirror: str | None = None) -> dict[str, str]:
    """File name → URL: the pinned GitHub URLs, or ``<mirror>/<name>`` (``mirror`` or $ATLAS_DEMO_MIRROR)."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if not mirror:
        return dict(SOURCES)
    if "://" not in mirror:
        mirror = Path(mirror).resolve().as_uri()
    return {name: f"{mirror.rstrip('/')}/{name}" for name in SOURCES}


# --- the content fingerprint ------------------------------------------------------------------

def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _names(values) -> bytes:
    return json.dumps([str(v) for v in values]).encode()


def fingerprint_parts(adata) -> dict[str, str]:
    """sha256 of each part of the content that makes the dataset (see :data:`PARTS`).

    ``X``: shape, then CSR ``indptr`` and ``indices`` (int64 little-endian) and ``data`` (float32
    little-endian), canonical (duplicates summed, zeros dropped, indices sorted). ``protein_counts``:
    the column names (JSON), then the values (float32 little-endian, row-major). Names and labels:
    JSON lists of strings (``null`` for a missing label). A missing part reads ``"missing"``.
    """
    import scipy.sparse as sp

    parts = {"obs_names": _sha(_names(adata.obs_names)), "var_names": _sha(_names(adata.var_names))}
    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)
    x.sum_duplicates()
    x.eliminate_zeros()
    x.sort_indices()
    parts["X"] = _sha(np.asarray(x.shape, "<i8").tobytes(), x.indptr.astype("<i8").tobytes(),
                      x.indices.astype("<i8").tobytes(), x.data.astype("<f4").tobytes())
    proteins = adata.obsm.get("protein_counts") if "protein_counts" in adata.obsm else None
    if isinstance(proteins, pd.DataFrame):
        parts["protein_counts"] = _sha(_names(proteins.columns),
                                       np.ascontiguousarray(proteins.to_numpy(dtype="<f4")).tobytes())
    else:
        parts["protein_counts"] = "missing"
    for level in LABELS:
        if level in adata.obs:
            values = [None if pd.isna(v) else str(v) for v in adata.obs[level].astype(object)]
            parts[level] = _sha(json.dumps(values).encode())
        else:
            parts[level] = "missing"
    return parts


def differences(parts: dict[str, str], expected: dict[str, str] | None = None) -> list[str]:
    """The parts that differ from ``expected`` (default :data:`EXPECTED_PARTS`), described."""
    expected = EXPECTED_PARTS if expected is None else expected
    return [DESCRIBE[k] for k in PARTS if parts.get(k) != expected[k]]


# --- reading the raw files --------------------------------------------------------------------

_BARCODE = re.compile(r"^[ACGTN]+[-.]\d+$")


def _looks_like_barcodes(names) -> bool:
    names = [str(n) for n in names]
    return bool(names) and sum(bool(_BARCODE.match(n)) for n in names) >= 0.9 * len(names)


def read_counts_csv(path: Path, what: str) -> pd.DataFrame:
    """A totalVI ``*_harmo_*.csv.gz`` as a cells × features frame (barcodes ``…-1``).

    The files are features × cells (the totalVI authors read them with R ``read.csv(row.names = 1)``
    into ``CreateSeuratObject(counts = …)``, which takes features in rows); a cells × features file
    is accepted too, told apart by which axis holds the 10x barcodes.
    """
    try:
        frame = pd.read_csv(path, index_col=0, keep_default_na=False, na_values=[])
    except Exception as e:  # noqa: BLE001 - any parse error means the file is not what we expect
        raise AtlasError(f"could not read {path} as the {what} count table (CSV): {e}") from None
    frame.index = frame.index.map(str)
    frame.columns = frame.columns.map(str)
    if _looks_like_barcodes(frame.columns):
        frame = frame.T
    elif not _looks_like_barcodes(frame.index):
        raise AtlasError(f"{path}: neither its rows nor its columns are 10x cell barcodes; "
                         f"it is not the {what} count table the demo expects")
    frame.index = [re.sub(r"\.(\d+)$", r"-\1", n) for n in frame.index]  # R's check.names turns '-' into '.'
    if not all(pd.api.types.is_numeric_dtype(t) for t in frame.dtypes):
        raise AtlasError(f"{path}: the {what} counts are not all numbers")
    return frame


def _require_pyreadr():
    try:
        import pyreadr
    except ImportError:
        raise AtlasError(
            "rebuilding the demo's dataset needs pyreadr to read ADTnorm's .rda files: "
            "pip install 'pyreadr==0.5.8' (or pip install -e '.[demo-download]'), or set "
            f"ATLAS_SHARED_DATA to a folder holding {PBMC10K}"
        ) from None
    return pyreadr


def read_rda(path: Path, name: str) -> pd.DataFrame:
    """The data frame ``name`` of an R ``.rda`` file (the file's only object if it has no such name)."""
    pyreadr = _require_pyreadr()
    try:
        objects = pyreadr.read_r(str(path))
    except Exception as e:  # noqa: BLE001 - librdata's errors: corrupt, truncated, not an .rda
        raise AtlasError(f"could not read {path} as an R data file: {e}") from None
    if name in objects:
        return objects[name]
    if len(objects) == 1:
        return next(iter(objects.values()))
    raise AtlasError(f"{path} has no object {name!r} (it has {', '.join(objects) or 'none'})")


def _integral(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise AtlasError(f"{what} are not all whole numbers: they are not raw antibody counts")
    return values.astype(np.int64)


def adtnorm_labels(proteins: pd.DataFrame, cell_x_adt: pd.DataFrame, cell_x_feature: pd.DataFrame,
                   study: str = ADTNORM_STUDY) -> pd.DataFrame:
    """ADTnorm's manual-gating labels for the cells of ``proteins`` (rows: cells), NaN where none.

    A cell takes ``cell_type_l1``/``cell_type_l2`` of the one ``study`` row of ADTnorm's tables whose
    raw counts of the 9 antibodies of :data:`JOIN_MARKERS` equal its own. Rows of other studies are
    never used; a cell with no matching row, with more than one (ambiguous, whatever their labels),
    or whose 9 counts another cell of ``proteins`` shares, gets NaN.
    """
    missing = [c for c in JOIN_MARKERS if c not in cell_x_adt.columns]
    missing += [c for c in ("study_name", *LABELS) if c not in cell_x_feature.columns]
    missing += [c for c in JOIN_MARKERS.values() if c not in proteins.columns]
    if missing:
        raise AtlasError(f"the label join needs columns that are not there: {', '.join(missing)}")
    if len(cell_x_adt) != len(cell_x_feature):
        raise AtlasError(f"ADTnorm's {ADT_RDA} ({len(cell_x_adt):,} rows) and {FEATURE_RDA} "
                         f"({len(cell_x_feature):,} rows) do not describe the same cells")
    keys = [f"k{i}" for i in range(len(JOIN_MARKERS))]
    in_study = (cell_x_feature["study_name"].astype(str) == study).to_numpy()
    reference = pd.DataFrame(_integral(cell_x_adt[list(JOIN_MARKERS)].to_numpy()[in_study], f"{ADT_RDA} counts"),
                             columns=keys)
    for level in LABELS:
        reference[level] = cell_x_feature[level].astype(object).to_numpy()[in_study]
    reference = reference[~reference.duplicated(keys, keep=False)]  # an ambiguous match is no match
    query = pd.DataFrame(_integral(proteins[list(JOIN_MARKERS.values())].to_numpy(), "the pbmc10k protein counts"),
                         columns=keys)
    joined = query.merge(reference, on=keys, how="left", validate="many_to_one")  # keeps the query's order
    labels = joined[list(LABELS)].astype(object)
    labels = labels.where(labels.notna(), np.nan)
    labels.loc[query.duplicated(keys, keep=False).to_numpy(), :] = np.nan
    labels.index = proteins.index
    return labels


def build_pbmc10k(folder: Path):
    """The AnnData of :data:`PBMC10K`, built from the four raw files in ``folder``."""
    import anndata as ad
    import scipy.sparse as sp

    rna = read_counts_csv(folder / RNA_CSV, "RNA")
    proteins = read_counts_csv(folder / PROTEIN_CSV, "protein")
    if not rna.index.is_unique or set(rna.index) != set(proteins.index):
        raise AtlasError(f"{RNA_CSV} and {PROTEIN_CSV} do not hold the same cells, once each")
    # The shared file orders the antibodies by name (whatever the order in the CSV).
    proteins = proteins.loc[rna.index, sorted(proteins.columns)].astype(np.float32)
    labels = adtnorm_labels(proteins, read_rda(folder / ADT_RDA, "cell_x_adt"),
                            read_rda(folder / FEATURE_RDA, "cell_x_feature"))
    obs = pd.DataFrame({"batch": pd.Categorical([BATCH] * len(rna))}, index=pd.Index(rna.index, dtype=object))
    for level in LABELS:
        obs[level] = pd.Categorical(labels[level].to_numpy())
    adata = ad.AnnData(X=sp.csr_matrix(rna.to_numpy(dtype=np.float32)), obs=obs,
                       var=pd.DataFrame(index=pd.Index(rna.columns, dtype=object)))
    proteins.index = adata.obs_names
    adata.obsm["protein_counts"] = proteins
    adata.uns["source"] = SOURCE_NOTE
    return adata


# --- download and cache -----------------------------------------------------------------------

def _download(url: str, path: Path, timeout: float = 60.0) -> None:
    """``url`` → ``path`` through a temporary file in the same folder, with a progress line."""
    tty = sys.stdout.isatty()
    with staged_file(path) as part:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                step = done * 10 // total if total else done >> 23  # every 10 %, or every 8 MiB
                if tty and step != shown:
                    shown = step
                    size = f"{done / 1e6:.1f} / {total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
                    print(f"\r   {path.name}: {size}", end="", flush=True)
        if total and done != total:
            raise OSError(f"the transfer stopped after {done:,} of {total:,} bytes")
        if tty:
            print("\r", end="")
        print(f"   {path.name}: {done / 1e6:.1f} MB from {url}", flush=True)


def _reason(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or e)


def _read_manifest(cache_dir: Path) -> dict:
    try:
        return json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(cache_dir: Path, urls: dict[str, str]) -> None:
    manifest = {
        "dataset": PBMC10K,
        "fingerprint": EXPECTED_FINGERPRINT,
        "files": {name: {"url": urls[name], "sha256": file_sha256(cache_dir / name),
                         "bytes": (cache_dir / name).stat().st_size} for name in urls},
    }
    with staged_file(cache_dir / "manifest.json") as part:
        part.write_text(json.dumps(manifest, indent=2) + "\n")


def _verified(path: Path) -> list[str]:
    """What differs between the h5ad at ``path`` and the expected content (empty: it matches)."""
    import anndata as ad

    try:
        return differences(fingerprint_parts(ad.read_h5ad(path)))
    except Exception as e:  # noqa: BLE001 - an unreadable file is as bad as a different one
        return [f"the file could not be read ({e})"]


def demo_dataset(shared_dir: Path, cache_dir: Path | None = None, *, mirror: str | None = None,
                 say: Callable[[str], None] = lambda m: print(f"\n== {m}", flush=True)) -> Path:
    """The path of :data:`PBMC10K`: ``shared_dir``'s when it has it, else a verified rebuild in ``cache_dir``.

    ``cache_dir`` defaults to :func:`demo_cache_dir`; ``mirror`` (or $ATLAS_DEMO_MIRROR) replaces the
    GitHub URLs. Raises :class:`AtlasError` when a download fails (the whole files fetched before it
    stay, for a rerun; the rebuild checks them) or when the rebuilt content is not the shared file's
    (then nothing this run downloaded is kept, and no h5ad is written).
    """
    shared_dir = Path(shared_dir)
    if (shared_dir / PBMC10K).exists():
        return shared_dir / PBMC10K
    cache_dir = Path(cache_dir) if cache_dir is not None else demo_cache_dir()
    target = cache_dir / PBMC10K
    absent = (f"the shared data folder {shared_dir} is absent" if not shared_dir.is_dir()
              else f"the shared data folder {shared_dir} has no {PBMC10K}")
    if target.exists():
        problems = _verified(target)
        if not problems:
            say(f"{absent}: using {target}, rebuilt earlier from the public sources "
                f"(content fingerprint {EXPECTED_FINGERPRINT[:16]}… verified)")
            return target
        say(f"the cached {target} is not the expected content ({'; '.join(problems)}): removing it and rebuilding")
        target.unlink()

    urls = source_urls(mirror)
    say(f"{absent}: downloading the public pbmc10k CITE-seq data (10x Genomics via "
        f"YosefLab/totalVI_reproducibility, labels from ADTnorm) into {cache_dir}")
    _require_pyreadr()
    cache_dir.mkdir(parents=True, exist_ok=True)
    recorded = _read_manifest(cache_dir).get("files", {})
    fetched, kept = [], []
    for name, url in urls.items():
        path = cache_dir / name
        if path.exists():
            sha = (recorded.get(name) or {}).get("sha256")
            if sha is None or file_sha256(path) == sha:
                print(f"   {name}: already in the cache"
                      + (" (sha256 matches the manifest)" if sha else " (not in the manifest: checked by the rebuild)"))
                kept.append(path)
                continue
            print(f"   {name}: in the cache but its sha256 is not the manifest's: fetching it again")
            path.unlink()
        try:
            _download(url, path)
        except (urllib.error.URLError, OSError, ValueError) as e:
            # The files fetched so far stay (whole files, checked by the rebuild): a rerun resumes.
            listing = "; ".join(f"{u} → {cache_dir / n}" for n, u in urls.items())
            raise AtlasError(
                f"could not download the demo's data: {url} failed ({_reason(e)}). "
                f"Either set ATLAS_SHARED_DATA to a folder holding {PBMC10K}, or download these files by hand "
                f"and rerun (they are checked): {listing}"
            ) from None
        fetched.append(path)

    reason: str | None
    try:
        adata = build_pbmc10k(cache_dir)
    except AtlasError as e:
        adata, reason = None, str(e)
    else:
        problems = differences(fingerprint_parts(adata))
        reason = f"{', '.join(problems)} differ from the shared file's" if problems else None
    if reason:
        for p in fetched:
            p.unlink(missing_ok=True)
        left = (f"; these files were already in {cache_dir} and are kept, delete them to fetch them again: "
                + ", ".join(p.name for p in kept)) if kept else ""
        raise AtlasError(
            f"the pbmc10k data rebuilt from {', '.join(urls.values())} is not the expected dataset "
            f"(content fingerprint {EXPECTED_FINGERPRINT}): {reason}. Nothing was kept: the downloaded "
            f"files were removed{left}. Set ATLAS_SHARED_DATA to a folder holding {PBMC10K} instead"
        )
    with staged_file(target) as part:
        adata.write_h5ad(part, compression="gzip")
    _write_manifest(cache_dir, urls)
    say(f"rebuilt {target} from the public sources: its content fingerprint {EXPECTED_FINGERPRINT[:16]}… "
        f"is the shared file's; the raw files' sha256 are in {cache_dir / 'manifest.json'}")
    return target
