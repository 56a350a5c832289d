"""What the build tests share: a subset of real cells and the small Concerto build config."""

from __future__ import annotations

import anndata as ad
import numpy as np

from atlas.train.config import build_config_from_dict

PBMC10K = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"


def subset(adata: ad.AnnData, n: int, seed: int = 0) -> ad.AnnData:
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))
    return adata[rows].copy()


def concerto_config(store, output, tmp, **overrides):
    """One epoch of a 32-d Concerto on 2 workers, both label levels indexed, proteins as profiles."""
    config = {
        "name": "test-concerto", "store": str(store), "output": str(output),
        "model": {"model": "concerto", "modalities": ["RNA"], "embed_dim": 32},
        "data": {"batch_size": 64, "single_domain": True},
        "train": {"epochs": 1, "lr": 1e-3, "checkpoint_every": 10},
        "scaling": {"num_workers": 2, "use_gpu": False},
        "run": {"storage_path": str(tmp / "runs"), "max_failures": 2},
        "index": {"levels": ["cell_type_l1", "cell_type_l2"], "profiles": ["protein"]},
    }
    for section, values in overrides.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return build_config_from_dict(config)
