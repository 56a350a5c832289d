"""Check the profile space across donors, where a PCA of uncorrected RNA could mislead: proteins of
one donor's cells predicted from an atlas of the other donor's (no scored query is read).

    python benchmarks/validate_profiles_batches.py [--epochs 5] [--out benchmarks/out/validate_profiles_batches]

Data: the NeurIPS 2021 BMMC CITE-seq starter set (600 bone-marrow cells, 1,000 genes, 134
antibodies, donors s1d1 and s1d2), both directions. For each, a Concerto RNA atlas is built on one
donor (the build's defaults: protein profiles, label levels ``cell_type_l1_derived`` ⊃ ``cell_type``)
and the other donor's RNA is mapped with ``batch`` given (its own normalisation statistics). Proteins
(1e4 + log1p) are predicted three ways from the same mapping: the profile space (the default:
embedding beside a PCA of RNA, 25 nearest, softmax weights), the embedding's 25 coarse neighbours
(plain mean, the rule before), and PCA + kNN (the peer). Score: Pearson r per protein across
cells, mean and median. Writes ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

DATA_FILE = "neurips21_bmmc_cite_starter_rna_with_adt.h5ad"
LEVELS = ["cell_type_l1_derived", "cell_type"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "validate_profiles_batches")
    args = parser.parse_args()

    import anndata as ad
    import pandas as pd
    import ray

    from atlas.artifact import load_atlas
    from atlas.build import build_atlas
    from atlas.evaluate.baselines import PcaKnnBaseline, log_normalise_frame
    from atlas.evaluate.metrics import feature_pearson
    from atlas.mapping.query import map_query
    from atlas.mapping.vote import mean_profile
    from atlas.store.ingest import ingest
    from atlas.train.config import build_config_from_dict
    from benchmarks.quality_tasks.common import data_file

    data = ad.read_h5ad(data_file(DATA_FILE))
    data.obs_names = data.obs_names.astype(str)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows, results = [], {}
    try:
        for ref_donor, query_donor in (("s1d1", "s1d2"), ("s1d2", "s1d1")):
            reference = data[data.obs["batch"] == ref_donor].copy()
            query = data[data.obs["batch"] == query_donor].copy()
            truth = log_normalise_frame(query.obsm["protein_counts"])
            del query.obsm["protein_counts"]
            store, artifact = out / f"store_{ref_donor}", out / f"atlas_{ref_donor}"
            ingest(store, reference, dataset_id=f"bmmc_{ref_donor}", obsm_modalities={"protein": "protein_counts"},
                   label_keys={lv: lv for lv in LEVELS}, batch_key="batch", species="human")
            build_atlas(build_config_from_dict({
                "name": f"profiles-{ref_donor}", "store": str(store), "output": str(artifact),
                "model": {"model": "concerto", "modalities": ["RNA"]},
                "data": {"batch_size": 64, "single_domain": True},
                "train": {"epochs": args.epochs, "lr": 1e-3, "seed": 0},
                "scaling": {"num_workers": 1, "use_gpu": False},
                "run": {"storage_path": str(out / "runs")},
                "index": {"levels": LEVELS, "profiles": ["protein"]}}), log=lambda m: print(m, flush=True))
            atlas = load_atlas(artifact)
            mapped = map_query(query, atlas, predict=["protein"], batch=query_donor, return_neighbors=True,
                               thresholds=None)
            coarse = atlas.shard(atlas.layout.root.shards[0])
            position = pd.Series(np.arange(coarse.n_cells), index=coarse.soma_joinid)
            ids = mapped.obsm["atlas_neighbors_soma_joinid"]
            neighbours = np.where(ids >= 0, position.reindex(ids.ravel()).fillna(-1).to_numpy().reshape(ids.shape), -1)
            features, values = coarse.profiles["protein"]
            baseline = PcaKnnBaseline().fit(reference, LEVELS, profiles={"protein": "protein_counts"})
            predictions = {
                "profile space (default)": mapped.obsm["protein_pred"],
                "embedding, plain mean (before)": pd.DataFrame(mean_profile(values, neighbours.astype(np.int64)),
                                                              columns=features),
                "PCA + kNN (the peer)": baseline.map(query).obsm["protein_pred"],
            }
            assert mapped.uns["atlas"]["profile_neighbours"] == "embedding+pca"
            for name, pred in predictions.items():
                frame = pd.DataFrame(np.asarray(pred, np.float32), index=truth.index, columns=list(features))
                r = feature_pearson(frame[truth.columns], truth)
                results[f"{ref_donor} -> {query_donor} | {name}"] = {"mean": r.mean, "median": r.median}
                rows.append(f"| {ref_donor} → {query_donor} | {name} | {r.mean:.4f} | {r.median:.4f} |")
    finally:
        ray.shutdown()
    table = "\n".join([f"Proteins of one BMMC donor from an atlas of the other ({args.epochs} epochs; "
                       f"{data.obsm['protein_counts'].shape[1]} proteins; r per protein across cells):", "",
                       "| direction | rule | r mean | r median |", "| --- | --- | ---: | ---: |", *rows])
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
