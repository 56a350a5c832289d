"""A small real atlas built without Ray: 800 pbmc10k reference cells, 200 held out as the query.

Real data, a real (1-epoch) Concerto, real faiss shards and a real artifact on disk — just small
enough that unit and Serve tests can share it (``tiny_atlas`` fixture in ``conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

PBMC = "pbmc10k_10x_cite_totalvi_rna4000hvg_adt14_labelled.h5ad"
LEVELS = ["cell_type_l1", "cell_type_l2"]


def build_tiny_atlas(source: Path, art: Path):
    """Build the artifact in ``art``; returns ``(Atlas, query AnnData without proteins, protein names)``."""
    import anndata as ad
    import torch

    from atlas.artifact import load_atlas, write_manifest
    from atlas.data.batches import csr_to_batch, normalize_log1p
    from atlas.index.profile_space import ProfileSpace
    from atlas.index.shards import build_hierarchy
    from atlas.mapping.calibrate import calibrate_thresholds
    from atlas.mapping.heads import read_heads, write_heads
    from atlas.mapping.search import LocalSearcher, ShardFolder
    from atlas.models.concerto import embedding_head_weights
    from atlas.models.config import ConcertoConfig, build_model, config_to_dict
    from atlas.train.step import fit_local, minibatches

    full = ad.read_h5ad(source)
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(full.n_obs, 1000, replace=False))
    data = full[cells].copy()
    ref, query = data[:800].copy(), data[800:].copy()
    rna = sp.csr_matrix(ref.X, dtype=np.float32)
    protein = ref.obsm["protein_counts"]
    prot_csr = sp.csr_matrix(protein.to_numpy(np.float32))
    prot_norm = prot_csr.copy()
    prot_norm.data = normalize_log1p(prot_norm.indptr, prot_norm.data)

    torch.manual_seed(0)
    config = ConcertoConfig(modalities=("RNA",), embed_dim=32)
    vocab_sizes = {"RNA": ref.n_vars}
    domain_names = sorted(ref.obs["batch"].unique())
    # As `atlas ingest --unlabeled undefined` stores them: cells the gating left unlabelled vote for nothing.
    labels = {lv: ref.obs[lv].astype(str).replace("undefined", "").to_numpy() for lv in LEVELS}
    # Label heads as a labelled build trains them (the cells' label codes stream with their counts).
    classes = [sorted(set(labels[lv]) - {""}) for lv in LEVELS]
    codes = np.stack([np.array([c.index(v) if v else -1 for v in labels[lv]]) for lv, c in zip(LEVELS, classes)], 1)
    model = build_model(config, vocab_sizes, len(domain_names), tuple(len(c) for c in classes))
    domain = np.array(pd.Categorical(ref.obs["batch"], categories=domain_names).codes, dtype=np.int64)
    batch = csr_to_batch({"RNA": rna}, domain=domain)
    batch["labels"] = torch.from_numpy(codes)
    fit_local(model, minibatches(batch, 128), epochs=1, lr=1e-3)
    model.eval()
    with torch.no_grad():
        emb = model.embed(batch).numpy()
    # As a build with profiles does: a PCA of the normalised RNA, and the coarse shard's second index.
    rna_norm = rna.copy()
    rna_norm.data = normalize_log1p(rna_norm.indptr, rna_norm.data)
    space = ProfileSpace.fit(rna_norm, "RNA", n_components=20)
    layout = build_hierarchy(
        emb, np.arange(800), labels, LEVELS,
        {"protein": (list(protein.columns), prot_norm.toarray())}, np.full(800, "pbmc10k"),
        use_gpu=False, out_dir=art / "shards", profile_vectors=space.vectors(emb, space.project(rna_norm)),
    )
    heads_entry = write_heads(art, embedding_head_weights(config, model.state_dict(), len(LEVELS)), LEVELS, classes)
    mapping = calibrate_thresholds(emb, np.arange(800), labels, LocalSearcher(ShardFolder(art / "shards")),
                                   layout, LEVELS, max_cells=400, heads=read_heads(art, {"model": {"heads": heads_entry}}),
                                   vote_balance=0.5, relative_similarity=False)  # as the build, for this embedding
    mapping["profile_space"] = space.save(art)
    torch.save(model.state_dict(), art / "model.pt")
    write_manifest(
        art, build_config={"data": {"normalization": {}}},
        model={"config": config_to_dict(config), "vocab_sizes": vocab_sizes,
               "n_domains": len(domain_names), "domain_names": domain_names, "heads": heads_entry},
        vocabulary={"RNA": list(ref.var_names), "protein": list(protein.columns)},
        store={"uri": "memory://test", "version": None, "committed_at": None}, metrics={},
        mapping=mapping, species="human",
    )
    del query.obsm["protein_counts"]
    return load_atlas(art), query, list(protein.columns)
