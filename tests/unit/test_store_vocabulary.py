"""Pure functions of the store: species / id-namespace inference, block planning, value checks."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas.cli import parse_pairs
from atlas.store.sources import InMemoryRows
from atlas.store.validate import as_strings, check_counts, row_blocks, scan_matrix
from atlas.store.versions import StoreError
from atlas.store.vocabulary import check_compatible, detect_namespace, infer_species


def test_namespace_by_modality_and_ensembl_prefix():
    assert detect_namespace("rna", pd.Index(["ENSG00000141510", "ENSG00000012048"])) == "ensembl"
    assert detect_namespace("rna", pd.Index(["TP53", "BRCA1"])) == "symbol"
    assert detect_namespace("protein", pd.Index(["CD3", "CD4"])) == "antibody"
    assert detect_namespace("atac", pd.Index(["chr1_100_200"])) == "peak"


@pytest.mark.parametrize(
    "ids, species",
    [
        (["Gad1", "Snap25", "Slc17a7", "0610040J01Rik"], "mouse"),
        (["GAD1", "SNAP25", "SLC17A7", "AL627309.1"], "human"),
        (["ENSMUSG00000070880", "ENSMUSG00000027273"], "mouse"),
        (["ENSG00000128683", "ENSG00000132639"], "human"),
        (["hg19_Foo1", "hg19_Bar2"], "human"),  # a genome prefix decides outright
        (["mm10_GAD1", "mm10_SNAP25"], "mouse"),
    ],
)
def test_species_inference(ids, species):
    ns = detect_namespace("rna", pd.Index(ids))
    assert infer_species(pd.Index(ids), ns).species == species


def test_antibodies_do_not_tell_species():
    call = infer_species(pd.Index(["CD3", "CD4"]), "antibody")
    assert call.species is None and "antibody" in call.reason


def test_mixing_species_or_namespace_refused():
    check_compatible("RNA", {}, "human", "symbol")
    check_compatible("RNA", {"species": "human", "id_namespace": "symbol"}, "human", "symbol")
    with pytest.raises(StoreError, match="mixing species"):
        check_compatible("RNA", {"species": "mouse", "id_namespace": "symbol"}, "human", "symbol")
    with pytest.raises(StoreError, match="ensembl"):
        check_compatible("RNA", {"species": "human", "id_namespace": "symbol"}, "human", "ensembl")


def test_row_blocks_bound_rows_and_nnz():
    m = sp.random(1000, 50, density=0.2, format="csr", random_state=0)
    blocks = list(row_blocks(InMemoryRows(m), max_rows=300, max_nnz=500))
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000
    assert all(a < b and b - a <= 300 for a, b in blocks)
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(blocks, blocks[1:]))
    nnz = np.diff(m.indptr)
    assert all(nnz[a:b].sum() <= 500 or b - a == 1 for a, b in blocks)


def test_scan_finds_non_counts_and_empty_rows():
    m = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [0.5, 0, 1], [-1, 0, 0], [np.nan, 1, 0]], dtype=np.float32))
    scan = scan_matrix(InMemoryRows(m), chunk_size=2)
    assert scan.non_integer == 1 and scan.negative == 1 and scan.non_finite == 1
    assert list(scan.row_nonzero) == [2, 0, 2, 1, 1]
    with pytest.raises(StoreError, match="NaN/inf"):
        check_counts(scan, "X of test", allow_normalized=True)
    ok = scan_matrix(InMemoryRows(sp.csr_matrix(np.array([[0.5, -1.0]]))))
    check_counts(ok, "X", allow_normalized=True)
    with pytest.raises(StoreError, match="--allow-normalized"):
        check_counts(ok, "X", allow_normalized=False)


def test_missing_labels_become_empty_strings():
    values = pd.Series(pd.Categorical(["T", None, "B"]))
    assert list(as_strings(values)) == ["T", "", "B"]
    assert list(as_strings(pd.Series([1.0, np.nan]))) == ["1.0", ""]


def test_cli_pairs():
    assert parse_pairs(["a=b", "c = d"], "--x", "K=V") == {"a": "b", "c": "d"}
    with pytest.raises(StoreError, match="expected K=V"):
        parse_pairs(["ab"], "--x", "K=V")
    with pytest.raises(StoreError, match="twice"):
        parse_pairs(["a=b", "a=c"], "--x", "K=V")
