"""The atlas artifact: a versioned, self-describing, content-hashed folder.

::

    ARTIFACT/
      manifest.json              written last (atomically): format, atlas version, created_at,
                                 build config, model section, vocabulary + hash, store
                                 (uri, version, committed_at), metrics, library versions,
                                 and sha256 + size of every other file
      model.pt                   torch state_dict of the trained model
      vocabulary/<modality>.txt  one feature id per line; line i = feature soma_joinid i
      shards/layout.json         the mapping tree (see atlas.index.shards.ShardLayout)
      shards/<shard name>/...    one folder per shard: index.faiss, cells.parquet,
                                 profiles/<modality>.npz, shard.json

Why hashes: an atlas is copied between machines and buckets, and a half-copied or edited index
would silently give wrong labels. :func:`load_atlas` therefore refuses any artifact whose files
differ from what its manifest lists (missing, extra, truncated or changed). The manifest holds
everything needed to rebuild the atlas (build config, store URI and version) and to rebuild the
model (config, vocabulary sizes, domains).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from atlas.errors import AtlasError
from atlas.provenance import library_versions

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.pt"
VOCAB_DIR = "vocabulary"
SHARDS_DIR = "shards"
NORMALIZATION_DIR = "normalization"
_MODEL_KEYS = ("config", "vocab_sizes", "n_domains", "domain_names")
_STORE_KEYS = ("uri", "version", "committed_at")
_FIX = "rebuild the atlas or restore the file"


class ArtifactError(AtlasError):
    """The artifact is missing, incomplete or was changed after it was built."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_manifest(
    artifact_dir: str | Path,
    *,
    build_config: dict[str, Any],
    model: dict[str, Any],
    vocabulary: dict[str, list[str]],
    store: dict[str, Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    atlas_version: str | None = None,
    mapping: dict[str, Any] | None = None,
    species: str | None = None,
    idf: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the vocabulary files and ``manifest.json``, sealing the artifact; returns the manifest.

    Call this last, after the shards (``shards/``) and the weights (``model.pt``) are written:
    every file then in the folder is hashed into the manifest, and anything added later makes
    :func:`verify_artifact` fail. ``model`` must hold ``config`` (``config_to_dict``),
    ``vocab_sizes``, ``n_domains`` and ``domain_names``; ``kind`` defaults to the config's model
    name and ``weights`` to ``model.pt``. ``vocabulary`` maps modality → feature ids ordered by
    feature soma_joinid. ``store`` holds ``uri``, ``version`` and ``committed_at``.
    ``atlas_version`` is generated (timestamp + short uuid) unless the build already chose one.
    ``mapping`` holds the calibrated unknown-rejection thresholds
    (:func:`atlas.mapping.calibrate.calibrate_thresholds`); ``species`` the store's species
    (queries of another species are refused); ``idf`` modality → the reference's inverse
    document frequencies (float32 per vocabulary id) for TF-IDF-normalised modalities, written
    to ``normalization/<modality>_idf.npy`` so a query is normalised exactly as the reference.
    """
    root = Path(artifact_dir)
    if not root.is_dir():
        raise ValueError(f"artifact folder {root} does not exist")
    model = _check_model(root, model)
    missing = [k for k in _STORE_KEYS if k not in store]
    if missing:
        raise ValueError(f"store section lacks {missing} (need uri, version, committed_at)")

    vocab_info = {}
    for modality in sorted(vocabulary):
        vocab_info[modality] = _write_vocabulary(root, modality, vocabulary[modality])
    idf_files = {}
    for modality, values in sorted((idf or {}).items()):
        idf_files[modality] = _write_idf(root, modality, values, len(vocabulary.get(modality, [])))

    now = _dt.datetime.now(_dt.UTC)
    manifest = {
        "format_version": FORMAT_VERSION,
        "atlas_version": atlas_version or f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}",
        "created_at": now.isoformat(timespec="seconds"),
        "build_config": _jsonable(build_config),
        "model": _jsonable(model),
        "vocabulary": vocab_info,
        "vocabulary_hash": vocabulary_hash(vocabulary),
        "store": _jsonable(store),
        "metrics": _jsonable(metrics),
        "species": species,
        "normalization": {"idf": idf_files},
        "mapping": _jsonable(mapping or {}),
        "extra": _jsonable(extra or {}),
        "libraries": library_versions(),
        "shards": f"{SHARDS_DIR}/layout.json" if (root / SHARDS_DIR / "layout.json").is_file() else None,
        "files": {rel: _file_record(root / rel) for rel in _list_files(root)},
    }
    # Atomic: a reader sees either no manifest (an unfinished build) or the whole of it.
    tmp = root / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    return manifest


def _check_model(root: Path, model: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in _MODEL_KEYS if k not in model]
    if missing:
        raise ValueError(f"model section lacks {missing}; it needs {list(_MODEL_KEYS)}")
    if int(model["n_domains"]) != len(model["domain_names"]):
        raise ValueError(f"n_domains={model['n_domains']} but {len(model['domain_names'])} domain names")
    out = {"kind": model["config"].get("model"), "weights": WEIGHTS, **model}
    if not (root / out["weights"]).is_file():
        raise ValueError(f"model weights {root / out['weights']} not found; save the state_dict first")
    return out


def _write_vocabulary(root: Path, modality: str, ids: list[str]) -> dict[str, Any]:
    ids = [str(i) for i in ids]
    bad = [i for i in ids if "\n" in i or "\r" in i]
    if bad:
        raise ValueError(f"{modality} feature ids contain line breaks: {bad[:3]}")
    path = root / VOCAB_DIR / f"{modality}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(i + "\n" for i in ids), encoding="utf-8")
    return {"file": f"{VOCAB_DIR}/{modality}.txt", "n_features": len(ids)}


def _write_idf(root: Path, modality: str, values: Any, n_features: int) -> str:
    import numpy as np

    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 1 or arr.size != n_features:
        raise ValueError(f"{modality} idf has shape {arr.shape}; expected ({n_features},) = its vocabulary size")
    rel = f"{NORMALIZATION_DIR}/{modality}_idf.npy"
    (root / NORMALIZATION_DIR).mkdir(exist_ok=True)
    np.save(root / rel, arr)
    return rel


def vocabulary_hash(vocabulary: dict[str, list[str]]) -> str:
    """sha256 over the vocabulary files in sorted modality order (name, then the file's bytes).

    Equal to the hash of what :func:`write_manifest` writes, so a caller can compare a store's
    current vocabulary with an atlas's without reading files.
    """
    h = hashlib.sha256()
    for modality in sorted(vocabulary):
        h.update(f"{modality}\0".encode())
        h.update("".join(f"{i}\n" for i in vocabulary[modality]).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays, tuples, Paths converted; NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN; a missing metric is null
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------
# Verifying
# ---------------------------------------------------------------------------------------------


def _list_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted POSIX relative paths."""
    files = []
    for path in root.rglob("*"):
        if path.is_file() and path != root / MANIFEST:
            files.append(path.relative_to(root).as_posix())
    return sorted(files)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The parsed manifest, or :class:`ArtifactError` when it is absent or unreadable."""
    root = Path(artifact_dir)
    if not root.is_dir():
        raise ArtifactError(f"atlas artifact {root} does not exist or is not a folder")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST}: not an atlas artifact, or its build did not finish; "
            "rebuild the atlas"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is unreadable ({e}); {_FIX}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} is not an atlas manifest (no 'files' table); {_FIX}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version!r}; this atlas package reads up to "
            f"{FORMAT_VERSION}: upgrade the package or rebuild the atlas"
        )
    for rel in manifest["files"]:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ArtifactError(f"{path} lists a file outside the artifact ({rel!r}); {_FIX}")
    return manifest


def verify_artifact(artifact_dir: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise :class:`ArtifactError`.

    Fails on a missing or unreadable manifest, and on any file that is missing, not listed
    (unexpected), of another size (truncated/grown) or — with ``hashes`` — of other content.
    ``hashes=False`` checks presence and sizes only (fast; see ``load_atlas(verify="lazy")``).
    The error lists every problem found.
    """
    root = Path(artifact_dir)
    manifest = read_manifest(root)
    expected = manifest["files"]
    present = set(_list_files(root))
    problems = [f"unexpected file {rel} (not in the manifest)" for rel in sorted(present - expected.keys())]
    problems += _check_files(root, expected, list(expected), hashes=hashes)
    _raise_if(root, problems)
    return manifest


def _raise_if(root: Path, problems: list[str]) -> None:
    if problems:
        shown = problems[:20] + ([f"… and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ArtifactError(f"atlas artifact {root} failed verification:\n  " + "\n  ".join(shown) + f"\n{_FIX}")


def _check_files(root: Path, expected: dict[str, Any], names: Iterable[str], *, hashes: bool) -> list[str]:
    problems = []
    for rel in names:
        record, path = expected[rel], root / rel
        if not path.is_file():
            problems.append(f"missing file {rel}")
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "changed"
            problems.append(f"{what} file {rel} ({size} bytes, manifest says {record['bytes']})")
        elif hashes and file_sha256(path) != record["sha256"]:
            problems.append(f"modified file {rel} (sha256 differs from the manifest)")
    return problems


def _verify_subset(root: Path, manifest: dict[str, Any], names: list[str]) -> None:
    """Hash-check some files (one shard's, or the weights) right before they are used."""
    _raise_if(root, _check_files(root, manifest["files"], names, hashes=True))


def _shard_files(manifest: dict[str, Any], shard: str) -> list[str]:
    """The manifest's files of one shard folder: its own files and profiles, not nested shards."""
    prefix = f"{SHARDS_DIR}/{shard}/"
    out = []
    for rel in manifest["files"]:
        if rel.startswith(prefix):
            rest = rel[len(prefix):].split("/")
            if len(rest) == 1 or (len(rest) == 2 and rest[0] == "profiles"):
                out.append(rel)
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class Atlas:
    """A verified atlas artifact: manifest, vocabularies, shard layout; shards and model on demand.

    Shards load lazily (``atlas.shard(name)``), so a Serve deployment that owns one shard reads
    only that shard. Build with :func:`load_atlas`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, lazy: bool = False):
        self.path = path
        self.manifest = manifest
        #: With ``lazy``, file hashes are checked when a shard or the model is first loaded.
        self._lazy = lazy
        self._shards: dict[tuple[str, bool | None, tuple[str, ...] | None], Any] = {}
        self._cache: dict[str, Any] = {}
        self.vocabulary: dict[str, list[str]] = {
            m: (path / info["file"]).read_text(encoding="utf-8").splitlines()
            for m, info in manifest.get("vocabulary", {}).items()
        }
        self.layout = None
        if manifest.get("shards"):
            from atlas.index.shards import ShardLayout

            self.layout = ShardLayout.read((path / manifest["shards"]).parent)

    @property
    def version(self) -> str:
        """The unique atlas version id (``YYYYmmddTHHMMSSZ-xxxxxxxx``)."""
        return self.manifest["atlas_version"]

    @property
    def vocabulary_hash(self) -> str:
        return self.manifest["vocabulary_hash"]

    @property
    def domain_names(self) -> list[str]:
        """The training domains (batches/donors) in the order the model's domain ids use."""
        return list(self.manifest["model"]["domain_names"])

    @property
    def species(self) -> str | None:
        """The species of the reference (``human``/``mouse``), when the build recorded it."""
        return self.manifest.get("species")

    def idf(self, modality: str) -> Any:
        """The reference's inverse document frequencies of a TF-IDF-normalised modality (float32
        per vocabulary id), or None when the atlas has none for it."""
        import numpy as np

        rel = (self.manifest.get("normalization") or {}).get("idf", {}).get(modality)
        if rel is None:
            return None
        if self._lazy:
            _verify_subset(self.path, self.manifest, [rel])
        return np.load(self.path / rel)

    def profile_space(self) -> Any:
        """The neighbour space profiles are predicted in (:class:`atlas.index.profile_space.ProfileSpace`),
        or None: an atlas built without one predicts them from the embedding's neighbours."""
        from atlas.index.profile_space import read_profile_space

        if "profile_space" not in self._cache:  # read (and verified) once
            entry = (self.manifest.get("mapping") or {}).get("profile_space") or {}
            if self._lazy and entry.get("file"):
                _verify_subset(self.path, self.manifest, [entry["file"]])
            self._cache["profile_space"] = read_profile_space(self.path, entry)
        return self._cache["profile_space"]

    def heads(self) -> Any:
        """The model's label heads (:class:`atlas.mapping.heads.Heads`), or None."""
        from atlas.mapping.heads import read_heads

        if "heads" not in self._cache:  # read (and verified) once: every mapped batch uses them
            entry = self.manifest["model"].get("heads") or {}
            if self._lazy and entry.get("file"):
                _verify_subset(self.path, self.manifest, [entry["file"]])
            self._cache["heads"] = read_heads(self.path, self.manifest)
        return self._cache["heads"]

    def shard_names(self) -> list[str]:
        return self.layout.shard_names() if self.layout else []

    def shard(self, name: str, *, use_gpu: bool | None = False, modalities: list[str] | None = None) -> Any:
        """Load (once, then cached) the shard called ``name`` (e.g. ``coarse``, ``fine/B_cell``)."""
        key = (name, use_gpu, tuple(modalities) if modalities is not None else None)
        if key not in self._shards:
            if name not in self.shard_names():
                raise KeyError(f"atlas {self.version} has no shard {name!r}; "
                               f"shards: {self.shard_names()[:20]}")
            if self._lazy:
                _verify_subset(self.path, self.manifest, _shard_files(self.manifest, name))
            from atlas.index.shards import load_shard

            folder = self.path / SHARDS_DIR / name
            self._shards[key] = load_shard(folder, use_gpu=use_gpu, modalities=modalities)
        return self._shards[key]

    def model(self, device: str = "cpu") -> Any:
        """Rebuild the trained model from the manifest and its weights, in eval mode."""
        import torch

        from atlas.models.config import model_from_spec

        section = self.manifest["model"]
        if self._lazy:
            _verify_subset(self.path, self.manifest, [section["weights"]])
        module = model_from_spec(section)
        state = torch.load(self.path / section["weights"], map_location=device, weights_only=True)
        module.load_state_dict(state)
        return module.to(device).eval()

    def __repr__(self) -> str:
        return f"Atlas(version={self.version!r}, path={str(self.path)!r}, shards={len(self.shard_names())})"


def load_atlas(path: str | os.PathLike, *, verify: str = "full") -> Atlas:
    """Open an atlas artifact after checking it against its manifest.

    ``verify="full"`` hashes every file now (refuses a tampered or truncated artifact with an
    :class:`ArtifactError` naming the file). ``"lazy"`` checks presence and sizes now and hashes
    each shard / the weights when first loaded — for Serve replicas that each use one shard of a
    large atlas.
    """
    if verify not in ("full", "lazy"):
        raise ValueError(f"verify must be 'full' or 'lazy', got {verify!r}")
    root = Path(path)
    manifest = verify_artifact(root, hashes=verify == "full")
    if verify == "lazy":  # what Atlas() reads right away is small: hash it now
        eager = [info["file"] for info in manifest.get("vocabulary", {}).values()]
        _verify_subset(root, manifest, eager + ([manifest["shards"]] if manifest.get("shards") else []))
    return Atlas(root, manifest, lazy=verify == "lazy")
