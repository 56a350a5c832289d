"""The service's wire format (atlas.wire): requests and responses round-trip exactly, and every
malformed body or parameter is a WireError with a message that says what is wrong."""

import inspect
import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas import wire
from atlas.wire import ARROW, CONTENT_TYPES, JSON, NPZ, MapParams, QueryPayload, WireError

FORMATS = [ARROW, NPZ, JSON]


def _payload(n=6, dtype=np.float32, params=None) -> QueryPayload:
    rng = np.random.default_rng(0)
    rna = sp.random(n, 9, density=0.4, random_state=1, format="csr", dtype=np.float64)
    rna.data = np.round(rna.data * 20).astype(dtype)
    prot = sp.csr_matrix(rng.poisson(5, size=(n, 3)).astype(np.float32))
    cells = [f"cell-{i}" for i in range(n)]
    cells[1] = cells[0]  # duplicate cell ids travel as they are
    return QueryPayload(cells, {"RNA": ([f"G{j}" for j in range(9)], sp.csr_matrix(rna, dtype=dtype)),
                                "protein": (["CD3", "CD4", "CD8"], prot)},
                        params or {"levels": ["l1"], "predict": [], "thresholds": {"l1": 0.5}})


def _same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a.toarray(), b.toarray())


@pytest.mark.parametrize("content_type", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_request_round_trip(content_type, dtype):
    sent = _payload(dtype=dtype)
    got = wire.decode_request(wire.encode_request(sent, content_type), content_type)
    assert got.cells == sent.cells
    assert got.params == sent.params
    assert list(got.modalities) == list(sent.modalities)
    for m, (features, counts) in sent.modalities.items():
        assert got.modalities[m][0] == features
        _same_csr(got.modalities[m][1], counts)


def test_request_keeps_values_that_float32_cannot_hold():
    """A non-integer value must reach the server's raw-count check exactly as offline sees it."""
    sent = _payload(dtype=np.float64)
    sent.modalities["RNA"][1].data[0] = 1.0000000001
    got = wire.decode_request(wire.encode_request(sent, ARROW), ARROW)
    assert got.modalities["RNA"][1].dtype == np.float64
    assert got.modalities["RNA"][1].data[0] == 1.0000000001
    # Exactly representable counts travel as float32 (half the bytes).
    small = wire.decode_request(wire.encode_request(_payload(dtype=np.float64), ARROW), ARROW)
    assert small.modalities["RNA"][1].dtype == np.float32


def test_payload_to_anndata_is_what_the_aligner_reads():
    from atlas.mapping.align import query_matrix, query_modalities

    sent = _payload()
    adata = sent.to_anndata()
    assert adata.n_obs == sent.n_cells
    assert query_modalities(adata) == ["RNA", "protein"]
    for m in ("RNA", "protein"):
        counts, features = query_matrix(adata, m)
        assert features == sent.modalities[m][0]
        _same_csr(counts, sent.modalities[m][1])


def test_json_request_from_a_hand_written_body():
    body = json.dumps({"cells": ["a", "b"], "features": ["G1", "G2"], "counts": [[1, 0], [0, 3]],
                       "modalities": {"protein": {"features": ["CD3"], "counts": [[2], [0]]}},
                       "params": {"levels": "l1,l2", "k_coarse": 10}}).encode()
    got = wire.decode_request(body, "application/json; charset=utf-8")
    assert got.cells == ["a", "b"]
    assert got.modalities["RNA"][1].toarray().tolist() == [[1, 0], [0, 3]]
    params = wire.parse_params(got.params)
    assert params.levels == ["l1", "l2"] and params.k_coarse == 10


@pytest.mark.parametrize("body,content_type,match", [
    (b"not json", JSON, "not valid JSON"),
    (b"[1, 2]", JSON, "must be an object"),
    (json.dumps({"cells": ["a"], "features": ["G"], "counts": [[1, 2]]}).encode(), JSON, "list of 1 numbers"),
    (json.dumps({"cells": ["a"], "features": ["G"], "counts": [["x"]]}).encode(), JSON, "must be numbers"),
    (json.dumps({"cells": ["a"], "features": ["G"], "counts": [[1]], "colour": 1}).encode(), JSON, "unknown key"),
    (json.dumps({"cells": [], "features": ["G"], "counts": []}).encode(), JSON, "no cells"),
    (json.dumps({"cells": ["a"]}).encode(), JSON, "no counts"),
    (json.dumps({"cells": ["a"], "modalities": {"RNAseq": {"features": ["G"], "counts": [[1]]}}}).encode(), JSON,
     "unknown modality"),
    (b"\x00garbage\xff" * 10, ARROW, "not a readable Arrow IPC stream"),
    (b"\x00garbage\xff" * 10, NPZ, "not a readable .npz"),
])
def test_malformed_requests_are_wire_errors(body, content_type, match):
    with pytest.raises(WireError, match=match):
        wire.decode_request(body, content_type)


def test_unsupported_content_type():
    with pytest.raises(wire.UnsupportedMediaType, match="unsupported content type 'text/csv'"):
        wire.decode_request(b"a,b", "text/csv")


def test_npz_with_bad_csr_or_pickled_arrays_is_refused():
    arrays = {"cell_id": np.array(["a", "b"]), "RNA.features": np.array(["G1", "G2"]),
              "RNA.data": np.array([1.0]), "RNA.indices": np.array([5]), "RNA.indptr": np.array([0, 1, 1])}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(WireError, match=r"indices must lie in \[0, 2\)"):
        wire.decode_request(buf.getvalue(), NPZ)
    arrays["RNA.indices"] = np.array([1])
    arrays["RNA.indptr"] = np.array([0, 1])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(WireError, match="indptr has 2 entries for 2 cells"):
        wire.decode_request(buf.getvalue(), NPZ)
    arrays["RNA.indptr"] = np.array([0, 1, 1])
    arrays["cell_id"] = np.array([{"a": 1}, None], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(WireError, match="without pickle"):
        wire.decode_request(buf.getvalue(), NPZ)


def test_limits_on_cells_and_expanded_size():
    body = wire.encode_request(_payload(n=6), ARROW)
    with pytest.raises(wire.TooManyCells, match="holds 6 cells; this server maps at most 5 .* atlas.client"):
        wire.decode_request(body, ARROW, max_cells=5)
    with pytest.raises(WireError, match="expands to more than 100 bytes"):
        wire.decode_request(body, ARROW, max_decoded_bytes=100)
    # A compressed npz that expands past the limit is refused before it is inflated.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("cell_id.npy", b"\x00" * 10_000_000)
    with pytest.raises(WireError, match="expands to 10000000 bytes"):
        wire.decode_request(buf.getvalue(), NPZ, max_decoded_bytes=1_000_000)


# -- parameters ---------------------------------------------------------------------------------


def test_map_query_reads_the_one_declaration():
    from atlas.mapping import map_query

    # No mapping parameter is declared again in map_query's signature: they are MapParams' fields.
    signature = inspect.signature(map_query).parameters
    assert not set(MapParams.model_fields) & set(signature), "declare mapping parameters in MapParams only"


def test_params_from_the_query_string():
    items = [("levels", "l1,l2"), ("predict", "none"), ("k_coarse", "30"), ("thresholds", "0.4"),
             ("return_neighbors", "true"), ("predict_method", "both")]
    params = wire.merge_params({}, wire.params_from_query(items))
    assert params == MapParams(levels=["l1", "l2"], predict=[], k_coarse=30, thresholds=0.4, return_neighbors=True,
                               predict_method="both")
    assert wire.params_from_query([("predict", "protein"), ("predict", "ATAC")])["predict"] == ["protein", "ATAC"]
    assert wire.params_from_query([("thresholds", "none")])["thresholds"] is None
    assert wire.params_from_query([("thresholds", '{"l1": 0.3}')])["thresholds"] == {"l1": 0.3}


@pytest.mark.parametrize("values,match", [
    ({"k_coarse": 0}, "k_coarse must be ≥ 1"),
    ({"k_coarse": 2.5}, "k_coarse must be an integer"),
    ({"predict_method": "magic"}, "predict_method must be one of"),
    ({"thresholds": "strict"}, "thresholds must be 'calibrated'"),
    ({"levels": [1, 2]}, "levels must be a list of names"),
    ({"return_neighbors": "yes"}, "return_neighbors must be true or false"),
    ({"min_fraction": 2}, "min_fraction must be ≤ 1"),
    ({"colour": "red"}, r"unknown parameter\(s\) \['colour'\]"),
])
def test_bad_params(values, match):
    with pytest.raises(WireError, match=match):
        wire.parse_params(values)


def test_bad_query_params_and_clashes():
    with pytest.raises(WireError, match="k_fine must be an integer, got 'five'"):
        wire.params_from_query([("k_fine", "five")])
    with pytest.raises(WireError, match="in the query string: unknown parameter 'level'"):
        wire.params_from_query([("level", "l1")])
    with pytest.raises(WireError, match=r"\['k_coarse'\] differ between the query string and the body"):
        wire.merge_params({"k_coarse": 10}, {"k_coarse": 20})
    assert wire.merge_params({"k_coarse": 10}, {"k_coarse": 10}).k_coarse == 10


# -- responses ----------------------------------------------------------------------------------


def _result_anndata(n=5, neighbours=True):
    """An AnnData laid out like map_query's result (NaN and -inf included)."""
    import anndata as ad

    rng = np.random.default_rng(3)
    index = pd.Index([f"c{i}" for i in range(n)], name="barcode")
    obs = pd.DataFrame(index=index)
    obs["l1_pred"] = np.array(["T cell", "unknown", "B cell", "NK", "T cell"][:n]).astype(str)
    obs["l1_confidence"] = rng.random(n).astype(np.float32)
    obs["l1_unknown"] = obs["l1_pred"] == "unknown"
    out = ad.AnnData(obs=obs)
    out.obsm["X_atlas"] = rng.standard_normal((n, 4)).astype(np.float32)
    profile = rng.random((n, 3)).astype(np.float32)
    profile[1] = np.nan
    out.obsm["protein_pred"] = pd.DataFrame(profile, index=index, columns=["CD3", "CD4", "CD8"])
    uns = {"atlas": {"version": "v1", "alignment": {"RNA": {"fraction": 0.123456789012345, "dropped": ["X"]}},
                     "levels": ["l1"], "thresholds": None, "n_no_data": 1}}
    if neighbours:
        sims = rng.random((n, 2)).astype(np.float32)
        sims[0, 1] = -np.inf
        out.obsm["atlas_neighbors_soma_joinid"] = rng.integers(-1, 100, (n, 2)).astype(np.int64)
        out.obsm["atlas_neighbors_similarity"] = sims
        uns["atlas_neighbors"] = {"dataset_id": np.array([["d1", ""]] * n).astype(str)}
    out.uns.update(uns)
    return out


def _assert_same_result(a, b):
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=True)
    assert list(a.obsm.keys()) == list(b.obsm.keys())
    for key in a.obsm.keys():
        x, y = a.obsm[key], b.obsm[key]
        assert type(x) is type(y), key
        if isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, check_exact=True)
            x, y = x.to_numpy(), y.to_numpy()
        assert x.dtype == y.dtype and x.shape == y.shape, key
        # Bit for bit (NaN payloads included).
        assert x.tobytes() == y.tobytes(), key
    assert list(a.uns.keys()) == list(b.uns.keys())
    assert a.uns["atlas"] == b.uns["atlas"]
    if "atlas_neighbors" in a.uns:
        x, y = a.uns["atlas_neighbors"]["dataset_id"], b.uns["atlas_neighbors"]["dataset_id"]
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("content_type", FORMATS)
@pytest.mark.parametrize("neighbours", [True, False])
def test_result_round_trip_is_exact(content_type, neighbours):
    original = _result_anndata(neighbours=neighbours)
    body = wire.encode_result(wire.result_from_anndata(original), content_type)
    back = wire.result_to_anndata(wire.decode_result(body, content_type), obs_names=original.obs_names)
    _assert_same_result(original, back)
    assert back.obs_names.name == "barcode"


def test_json_result_is_strict_json():
    body = wire.encode_result(wire.result_from_anndata(_result_anndata()), JSON)
    doc = json.loads(body, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert "NaN" in json.dumps(doc) and "-Infinity" in json.dumps(doc)


def test_concat_results_sums_no_data_and_refuses_mixed_versions():
    full = _result_anndata(n=5)

    def chunk(i, j):  # what the service returns for cells i:j (AnnData slicing leaves uns whole)
        part = full[i:j].copy()
        part.uns["atlas_neighbors"] = {"dataset_id": full.uns["atlas_neighbors"]["dataset_id"][i:j]}
        return wire.result_from_anndata(part)

    parts = [chunk(0, 2), chunk(2, 5)]
    merged = wire.result_to_anndata(wire.concat_results(parts), obs_names=full.obs_names)
    expected = full.copy()
    expected.uns["atlas"]["n_no_data"] = 2  # each chunk reported 1
    _assert_same_result(expected, merged)
    parts[1].uns["atlas"]["version"] = "v2"
    with pytest.raises(WireError, match="atlas version v1 vs v2"):
        wire.concat_results(parts)


def test_choose_response_type():
    assert wire.choose_response_type(ARROW, None) == ARROW
    assert wire.choose_response_type(ARROW, "*/*") == ARROW
    assert wire.choose_response_type(NPZ, f"{JSON}, {ARROW}") == JSON
    assert set(CONTENT_TYPES) == {ARROW, NPZ, JSON}
