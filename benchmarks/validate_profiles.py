"""Choose how missing modalities are predicted, on the reference alone: leave-one-out over an atlas's
reference cells (each cell's profile predicted from its neighbours among the *other* reference
cells; no query is read).

    python benchmarks/validate_profiles.py [--artifact demo_out/artifact] [--modality protein]

Variants: the neighbour space (the atlas embedding, its teacher or student half, a PCA of the
reference's log-normalised RNA — what the PCA + kNN peer uses — and the two side by side with PCA
weight w), the number of neighbours k, and the weighting (uniform, softmax of the similarity at
temperature t). Score: Pearson r per feature across cells (as ``benchmarks/quality.py`` scores the
query), mean and median over features. Prints the table and writes
``benchmarks/out/validate_profiles.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def loo_neighbours(space: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and rows of each cell's ``k`` nearest other cells."""
    import faiss

    from atlas.index.faiss_index import normalize

    x = normalize(space)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, rows = index.search(x, k + 1)
    own = rows == np.arange(len(x))[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # the cell itself last, then cut
    return np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=HERE.parent / "demo_out" / "artifact")
    parser.add_argument("--modality", default="protein")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    import faiss
    import pandas as pd
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from atlas.artifact import load_atlas
    from atlas.data.reader import read_csr
    from atlas.evaluate.baselines import _log_normalised
    from atlas.evaluate.metrics import feature_pearson
    from atlas.index.faiss_index import normalize

    atlas = load_atlas(args.artifact)
    coarse = atlas.shard(atlas.layout.root.shards[0])
    if len(atlas.layout.root.shards) != 1:
        sys.exit("this check reads the one coarse shard of a hierarchy layout")
    if ((atlas.manifest.get("mapping") or {}).get("profile_space") or {}).get("labels"):
        sys.exit("this atlas's index holds profile-space vectors, not its embedding: build it with "
                 "index.label_space: embedding to compare neighbour spaces")
    embedding = faiss.downcast_index(coarse.index).reconstruct_n(0, coarse.index.ntotal)
    _, profile = coarse.profiles[args.modality]
    measured = np.asarray(profile.toarray() if sp.issparse(profile) else profile, np.float32)
    keep = ~np.isnan(measured).all(axis=1)
    counts = read_csr(atlas.manifest["store"]["uri"], "RNA", coarse.soma_joinid.astype(np.int64))
    pcs = PCA(50, random_state=0).fit_transform(_log_normalised(counts).toarray()).astype(np.float32)
    half = embedding.shape[1] // 2
    spaces = {"atlas embedding": embedding, "teacher half": embedding[:, :half],
              "student half": embedding[:, half:], "PCA of RNA (the peer's)": pcs}
    for w in (0.5, 1.0, 2.0):
        spaces[f"atlas embedding + {w:g} x PCA"] = np.hstack([normalize(embedding), w * normalize(pcs)])

    rows, results = [], {}
    for name, space in spaces.items():
        sims_all, pos_all = loo_neighbours(space, 50)
        for k in (10, 25, 50):
            sims, pos = sims_all[:, :k], pos_all[:, :k]
            for weighting in ("uniform", "softmax t=0.05"):
                w = np.ones_like(sims) if weighting == "uniform" else np.exp((sims - sims[:, :1]) / 0.05)
                pred = (w[:, :, None] * measured[pos]).sum(1) / w.sum(1, keepdims=True)
                r = feature_pearson(pd.DataFrame(pred[keep]), pd.DataFrame(measured[keep]))
                results[f"{name} | k {k} | {weighting}"] = {"mean": r.mean, "median": r.median}
                rows.append(f"| {name} | {k} | {weighting} | {r.mean:.4f} | {r.median:.4f} |")
    table = "\n".join([f"Leave-one-out over {int(keep.sum()):,} reference cells of {args.artifact} "
                       f"({args.modality}, {measured.shape[1]} features):", "",
                       "| neighbour space | k | weighting | r mean | r median |", "| --- | ---: | --- | ---: | ---: |",
                       *rows])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate_profiles.md").write_text(table + "\n")
    (args.out / "validate_profiles.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
