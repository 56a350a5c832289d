"""Cosine-similarity nearest-neighbour indexes over reference embeddings, built with faiss.

Every index here holds L2-normalised vectors under the inner-product metric, so a search score
*is* the cosine similarity (the kNN vote weights neighbours by it). The kind is chosen by size:

* ``flat`` — exact search; the default below ``exact_below`` cells (exact answers are cheap there
  and make small atlases reproducible to the neighbour).
* ``ivf`` — inverted lists (nlist ≈ 4·√n) trained on a seeded sample; ``nprobe`` is chosen at
  build time as the fewest lists that find :data:`TARGET_RECALL` of each of a sample of
  reference cells' :data:`RECALL_K` nearest other cells (:func:`tune_nprobe`), and saved inside
  the index file, so a loaded index searches exactly as it was tested.
* ``hnsw`` — graph index (M = 32); ``efSearch`` is saved with the index too.

GPU: when faiss-gpu sees a GPU and ``use_gpu`` is not False, flat and IVF indexes are moved to
the GPU with ``faiss.index_cpu_to_gpu`` (HNSW has no faiss GPU version and stays on the CPU).
:func:`save_index` always writes the CPU form. On a GPU machine with only faiss-cpu installed, an
exact index is served by :class:`TorchFlatIndex` (a torch matmul + top-k on the GPU).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Protocol

import faiss
import numpy as np

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]

#: HNSW graph degree (faiss's recommended range is 16–64; 32 balances memory and recall).
HNSW_M = 32
#: Candidate list size while inserting into HNSW (higher = better graph, slower build).
HNSW_EF_CONSTRUCTION = 80
#: Candidate list size while searching HNSW; saved with the index.
HNSW_EF_SEARCH = 128
#: faiss wants at least 39 training points per IVF list; we sample up to 64 per list.
_IVF_POINTS_PER_LIST = 64


class SearchableIndex(Protocol):
    """What :func:`search` needs: a faiss index or a :class:`TorchFlatIndex`."""

    ntotal: int
    d: int

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def normalize(x: np.ndarray) -> np.ndarray:
    """A float32, C-contiguous, row-wise L2-normalised copy of ``x`` (zero rows stay zero)."""
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-d [cells, dims] matrix, got shape {out.shape}")
    if out.shape[0]:
        faiss.normalize_L2(out)
    return out


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but keep the index usable
        return False
    return torch.cuda.is_available()


def ivf_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: ≈ 4·√n, but never more lists than can be trained."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39 if n >= 39 else 1))


def ivf_nprobe(nlist: int) -> int:
    """Lists probed per query before tuning (and where no vectors are added yet): 1/16 of the
    lists, at least 8."""
    return max(1, min(nlist, max(8, nlist // 16)))


#: Neighbours per query the IVF probe count is tuned for (the mapping vote's k).
RECALL_K = 25
#: Share of a reference cell's RECALL_K nearest other cells an IVF search must find.
TARGET_RECALL = 0.99
#: Reference cells the recall is measured on.
RECALL_QUERIES = 1000


def tune_nprobe(index: Any, x: np.ndarray, *, k: int = RECALL_K, target: float = TARGET_RECALL,
                queries: int = RECALL_QUERIES, seed: int = 0) -> tuple[int, float]:
    """Set ``index.nprobe`` (a CPU IVF index over the unit rows ``x``) to the fewest lists, a power
    of two, whose search finds ``target`` of the ``k`` nearest *other* cells of ``queries`` sampled
    reference cells (exact answers by brute force); all lists if none does. Returns ``(nprobe,
    recall)``.

    On a 336k-cell protein atlas (2,320 lists) this picks 32 (recall 0.997 on reference cells,
    0.991 on cells of three held-out studies) where the fixed 1/16 of the lists probed 145: the
    coarse search 5× faster, 99.75% of the level-1 votes unchanged."""
    ivf = faiss.extract_index_ivf(index)
    n = int(ivf.ntotal)
    k = min(k, n - 1)
    if k < 1:
        return int(ivf.nprobe), 1.0
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    sample = np.ascontiguousarray(x[rows], dtype=np.float32)
    _, exact = faiss.knn(sample, np.ascontiguousarray(x, dtype=np.float32), k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    nprobe, recall = 1, 0.0
    while True:
        ivf.nprobe = min(nprobe, ivf.nlist)
        _, found = index.search(sample, k + 1)
        recall = float(np.mean([len((set(a) & set(b)) - {r}) / k for a, b, r in zip(found, exact, rows)]))
        if recall >= target or ivf.nprobe >= ivf.nlist:
            return int(ivf.nprobe), recall
        nprobe *= 2


def choose_kind(n: int, kind: IndexKind = "auto", exact_below: int = 200_000) -> str:
    """Resolve ``"auto"``: exact below ``exact_below`` cells, IVF above."""
    if kind == "auto":
        return "flat" if n < exact_below else "ivf"
    if kind not in ("flat", "ivf", "hnsw"):
        raise ValueError(f"unknown index kind {kind!r}; expected auto, flat, ivf or hnsw")
    return kind


def build_index(
    embeddings: np.ndarray,
    *,
    kind: IndexKind = "auto",
    exact_below: int = 200_000,
    use_gpu: bool | None = None,
    seed: int = 0,
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int = HNSW_EF_SEARCH,
) -> Any:
    """Build a cosine-similarity index over ``embeddings`` ([n, d], one row per reference cell).

    Rows are L2-normalised (a copy; the input is untouched) and the metric is inner product.
    ``kind="auto"`` picks exact ``flat`` below ``exact_below`` cells and ``ivf`` above.
    ``use_gpu``: None = use a GPU when one is usable, True = require one, False = CPU only.
    Row i of ``embeddings`` is position i in search results. Without a GPU faiss, HNSW and IVF
    are built on the CPU; an empty input gives an empty flat index whatever ``kind`` says.
    Returns a faiss index (CPU or GPU) or a :class:`TorchFlatIndex`.
    """
    x = normalize(embeddings)
    n, d = x.shape
    if d == 0:
        raise ValueError("embeddings have zero dimensions")
    resolved = choose_kind(n, kind, exact_below)
    if n == 0:  # an empty hash part: nothing to train IVF on, and an empty flat index is exact
        resolved = "flat"
    want_gpu = _want_gpu(use_gpu)

    index: Any  # faiss's stubs are incomplete (nprobe, cp, hnsw)
    if resolved == "flat":
        if want_gpu == "torch":
            return TorchFlatIndex(x)
        index = faiss.IndexFlatIP(d)
    elif resolved == "ivf":
        lists = min(nlist or ivf_nlist(n), n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = nprobe or ivf_nprobe(lists)
        # Train on a seeded sample: reproducible builds, and k-means cost bounded by nlist not n.
        rng = np.random.default_rng(seed)
        n_train = min(n, lists * _IVF_POINTS_PER_LIST)
        sample = x[np.sort(rng.choice(n, size=n_train, replace=False))] if n_train < n else x
        index.cp.seed = seed
        index.train(sample)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = ef_search

    if n:
        index.add(x)
        if resolved == "ivf" and nprobe is None:
            tune_nprobe(index, x, seed=seed)
    if want_gpu == "faiss" and resolved != "hnsw":
        index = to_gpu(index)  # with its vectors and nprobe
    return index


def _want_gpu(use_gpu: bool | None) -> str | None:
    """``"faiss"`` (faiss-gpu), ``"torch"`` (GPU but only faiss-cpu) or None (CPU)."""
    if use_gpu is False:
        return None
    if gpu_available():
        return "faiss"
    if _torch_cuda_available():
        return "torch"
    if use_gpu:
        raise RuntimeError("use_gpu=True but no GPU is visible to faiss or torch")
    return None


def search_parameters(index: Any) -> dict[str, int]:
    """What an approximate CPU index searches with (``nprobe`` of IVF, ``ef_search`` of HNSW; empty
    for an exact index), for the shard's description."""
    kind = index_kind(index)
    if kind == "ivf" and not type(index).__name__.startswith("Gpu"):
        return {"nprobe": int(faiss.extract_index_ivf(index).nprobe)}
    if kind == "hnsw":
        return {"ef_search": int(index.hnsw.efSearch)}
    return {}


def to_gpu(index: Any, device: int = 0) -> Any:
    """Move a CPU faiss index to a GPU, keeping ``nprobe``."""
    nprobe = getattr(faiss.extract_index_ivf(index), "nprobe", None) if _is_ivf(index) else None
    resources = faiss.StandardGpuResources()
    gpu_index: Any = faiss.index_cpu_to_gpu(resources, device, index)
    gpu_index.referenced_resources = resources  # keep the resources alive with the index
    if nprobe is not None:  # set again: not every faiss version copies it across
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", nprobe)
    return gpu_index


def to_cpu(index: Any) -> Any:
    """The CPU form of an index (what :func:`save_index` writes)."""
    if isinstance(index, TorchFlatIndex):
        return index.to_faiss()
    if hasattr(faiss, "index_gpu_to_cpu") and type(index).__name__.startswith("Gpu"):
        return faiss.index_gpu_to_cpu(index)
    return index


def _is_ivf(index: Any) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return False
    return True


def index_kind(index: Any) -> str:
    """``"flat"``, ``"ivf"``, ``"hnsw"`` or the faiss class name for anything else."""
    if isinstance(index, TorchFlatIndex):
        return "flat"
    name = type(index).__name__  # GPU classes by name: copying a GPU index back just to ask is costly
    if name.startswith("GpuIndexFlat"):
        return "flat"
    if name.startswith("GpuIndexIVF"):
        return "ivf"
    cpu = to_cpu(index)
    if isinstance(cpu, faiss.IndexFlat):
        return "flat"
    if isinstance(cpu, faiss.IndexHNSW):
        return "hnsw"
    if _is_ivf(cpu):
        return "ivf"
    return type(cpu).__name__


def search(index: SearchableIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar reference cells of each query row.

    Queries are L2-normalised (a copy). ``k`` is capped at the index size, so the result has
    ``min(k, ntotal)`` columns. Returns ``(similarities float32 [m, k], positions int64 [m, k])``
    sorted best first; positions are rows of the embeddings the index was built from. An
    approximate index can return fewer than k hits: those slots have position -1 and similarity
    -inf (a voter must skip them).
    """
    q = normalize(queries)
    if q.shape[1] != index.d:
        raise ValueError(f"queries have {q.shape[1]} dimensions, the index has {index.d}")
    k = min(int(k), int(index.ntotal))
    if k <= 0 or q.shape[0] == 0:
        return np.zeros((q.shape[0], max(k, 0)), np.float32), np.zeros((q.shape[0], max(k, 0)), np.int64)
    sims, pos = index.search(q, k)
    sims = np.asarray(sims, dtype=np.float32)
    pos = np.asarray(pos, dtype=np.int64)
    sims[pos < 0] = -np.inf
    return sims, pos


def save_index(index: SearchableIndex, path: str | Path) -> None:
    """Write an index (its CPU form) to ``path``; search parameters travel with it."""
    faiss.write_index(to_cpu(index), str(path))


def load_index(path: str | Path, *, use_gpu: bool | None = False) -> Any:
    """Read an index written by :func:`save_index`.

    ``use_gpu`` as in :func:`build_index`, but off by default: a loaded index is usually a serving
    replica, and whether it owns a GPU is the deployment's decision, not the file's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    index = faiss.read_index(str(path))
    target = _want_gpu(use_gpu)
    if target == "faiss" and not isinstance(index, faiss.IndexHNSW):
        return to_gpu(index)
    if target == "torch" and isinstance(index, faiss.IndexFlat):
        return TorchFlatIndex(index.reconstruct_n(0, index.ntotal))
    return index


class TorchFlatIndex:
    """Exact inner-product search on a GPU with torch, for machines without faiss-gpu.

    Same ``search(q, k)`` surface as a faiss index; vectors must already be normalised (they are
    when built through :func:`build_index`). Queries run in blocks to bound GPU memory.
    """

    def __init__(self, vectors: np.ndarray, device: str | None = None, block: int = 4096):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vectors = torch.as_tensor(np.ascontiguousarray(vectors, np.float32), device=self.device)
        self.block = block

    @property
    def ntotal(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    def add(self, x: np.ndarray) -> None:
        import torch

        self.vectors = torch.cat([self.vectors, torch.as_tensor(x, device=self.device)])

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        k = min(k, self.ntotal)
        sims, pos = [], []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.block):
                q = torch.as_tensor(np.ascontiguousarray(x[start : start + self.block]), device=self.device)
                s, p = torch.topk(q @ self.vectors.T, k, dim=1)
                sims.append(s.float().cpu().numpy())
                pos.append(p.cpu().numpy().astype(np.int64))
        if not sims:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(sims), np.concatenate(pos)

    def to_faiss(self) -> faiss.IndexFlatIP:
        """The same vectors in a CPU faiss flat index (for saving)."""
        index = faiss.IndexFlatIP(self.d)
        if self.ntotal:
            index.add(self.vectors.cpu().numpy())
        return index


def merge_topk(
    results: list[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard ``(similarities, positions)`` of the same queries into one top-k.

    For a group split over several shards (hash shards, or a group over ``max_shard_cells``).
    Returns ``(similarities, positions, shard_number)``, each [m, k'], best first; shard_number
    says which entry of ``results`` a hit came from (positions are local to that shard).
    """
    if not results:
        raise ValueError("nothing to merge")
    order = topk_order([s for s, _ in results], k)
    pos = np.concatenate([p for _, p in results], axis=1)
    src = np.concatenate([np.full(p.shape, i, np.int64) for i, (_, p) in enumerate(results)], axis=1)
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(np.concatenate([s for s, _ in results], axis=1)), take(pos), take(src)


def topk_order(similarities: list[np.ndarray], k: int) -> np.ndarray:
    """Columns of the side-by-side concatenation of per-shard ``[m, k_i]`` similarities that
    form the merged top-``k`` (best first; ties keep shard order, then rank)."""
    sims = np.concatenate(similarities, axis=1)
    return np.argsort(-sims, axis=1, kind="stable")[:, : min(k, sims.shape[1])]
