"""One row reader for the ingest and the offline mapper, with one policy for CSC matrices."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas.mapping import MappingError
from atlas.mapping.query_source import block_to_anndata, open_query, plan_query_blocks, read_query_block
from atlas.store import rows
from atlas.store.sources import open_source
from atlas.store.versions import StoreError


@pytest.fixture
def files(tmp_path):
    x = sp.random(40, 12, density=0.3, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
                   var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))
    out = {}
    for kind, matrix in (("csr", x), ("csc", x.tocsc()), ("dense", x.toarray())):
        b = a.copy()
        b.X = matrix
        out[kind] = tmp_path / f"{kind}.h5ad"
        b.write_h5ad(out[kind])
    return x, out


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_every_layout_reads_the_same_rows_for_ingest_and_query(files, kind):
    x, paths = files
    with h5py.File(paths[kind]) as f:
        reader = rows.anndata_rows(f["X"])
        assert reader.shape == x.shape
        for start, stop in ((0, 7), (7, 40), (39, 40), (5, 5)):
            np.testing.assert_array_equal(reader.rows(start, stop).toarray(), x[start:stop].toarray())
    source = open_source(paths[kind])
    np.testing.assert_array_equal(source.matrix.rows(3, 19).toarray(), x[3:19].toarray())
    source.close()
    query = open_query(paths[kind])
    back = ad.concat([block_to_anndata(read_query_block(query, b), query.features)
                      for b in plan_query_blocks(query, 9)])
    np.testing.assert_array_equal(back.X.toarray(), x.toarray())


def test_a_csc_matrix_too_large_to_read_whole_is_refused_by_both(files, monkeypatch):
    _, paths = files
    monkeypatch.setattr(rows, "CSC_MAX_ENTRIES", 10)
    with pytest.raises(StoreError, match="column by column .CSC.*rewrite it as CSR"):
        open_source(paths["csc"])
    with pytest.raises(MappingError, match="column by column .CSC.*rewrite it as CSR"):
        open_query(paths["csc"])
    open_source(paths["csr"]).close()  # CSR is read by rows whatever its size
    open_query(paths["csr"])
