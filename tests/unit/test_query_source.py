"""Reading a query block by block (the offline mapper's read tasks), without Ray."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas.mapping import MappingError
from atlas.mapping.query_source import block_to_anndata, open_query, plan_query_blocks, read_query_block


@pytest.fixture
def adata():
    rng = np.random.default_rng(0)
    x = sp.random(50, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(50)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    a.obsm["protein_counts"] = pd.DataFrame(rng.poisson(5, (50, 4)).astype(np.float32), index=a.obs_names,
                                            columns=["CD3", "CD4", "CD8", "CD19"])
    return a


def _read_all(path, modalities=("RNA", "protein"), block_cells=16):
    source = open_query(path, modalities)
    blocks = plan_query_blocks(source, block_cells)
    assert [(b.start, b.stop) for b in blocks] == [(s, min(s + block_cells, source.n_cells))
                                                   for s in range(0, source.n_cells, block_cells)]
    parts = [block_to_anndata(read_query_block(source, b), source.features) for b in blocks]
    return source, ad.concat(parts)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr2", "zarr3"])
def test_blocks_reassemble_the_query(adata, tmp_path, fmt):
    path = tmp_path / ("q.h5ad" if fmt == "h5ad" else "q.zarr")
    if fmt == "h5ad":
        adata.write_h5ad(path)
    else:
        with ad.settings.override(zarr_write_format=int(fmt[-1])):
            adata.write_zarr(path)
    source, back = _read_all(path)
    assert source.n_cells == 50 and source.matrices["protein"].element == "obsm/protein_counts"
    assert list(back.obs_names) == list(adata.obs_names) and list(back.var_names) == list(adata.var_names)
    np.testing.assert_array_equal(back.X.toarray(), adata.X.toarray())
    np.testing.assert_array_equal(back.obsm["protein"].to_numpy(), adata.obsm["protein_counts"].to_numpy())
    assert list(back.obsm["protein"].columns) == ["CD3", "CD4", "CD8", "CD19"]


def test_counts_layer_first_and_dense_x(adata, tmp_path):
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X.toarray())  # dense, normalised: must not be read
    adata.write_h5ad(tmp_path / "q.h5ad")
    source, back = _read_all(tmp_path / "q.h5ad", ("RNA",))
    assert source.matrices["RNA"].element == "layers/counts"
    np.testing.assert_array_equal(back.X.toarray(), adata.layers["counts"].toarray())
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "d.h5ad")
    source, back = _read_all(tmp_path / "d.h5ad", ("RNA",), block_cells=7)
    assert source.matrices["RNA"].kind == "matrix"
    np.testing.assert_allclose(back.X.toarray(), adata.X)


def test_refusals(adata, tmp_path):
    csc = adata.copy()
    csc.X = csc.X.tocsc()
    csc.write_h5ad(tmp_path / "csc.h5ad")
    unnamed = adata.copy()
    unnamed.obsm["protein"] = unnamed.obsm.pop("protein_counts").to_numpy()
    unnamed.write_h5ad(tmp_path / "unnamed.h5ad")
    with pytest.raises(MappingError, match="no feature names"):
        open_query(tmp_path / "unnamed.h5ad", ("RNA", "protein"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(MappingError, match="not an AnnData-zarr"):
        open_query(tmp_path / "folder")
    with pytest.raises(MappingError, match="block_cells"):
        plan_query_blocks(open_query(tmp_path / "csc.h5ad", ("protein",)), 0)
