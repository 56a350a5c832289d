"""The SDK's own behaviour against a scripted server (httpx MockTransport, no Ray): chunking,
splitting a chunk the server finds too large, retrying 503s, and errors with the server's message.
The real service is exercised in tests/integration/test_serve.py."""

import json

import httpx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas import wire
from atlas.client import AtlasClient, AuthenticationError, RequestRejected, ServiceUnavailableError

GENES = [f"G{i}" for i in range(20)]


def _query(n=50):
    import anndata as ad

    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(1.0, (n, len(GENES))).astype(np.float32))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n)], name="barcode")),
                       var=pd.DataFrame(index=GENES))
    adata.obsm["protein"] = pd.DataFrame(rng.poisson(3, (n, 2)), index=adata.obs_names, columns=["CD3", "CD4"])
    return adata


class Server:
    """Answers /v1/map with a result derived from the request (so the test can check the cells)."""

    def __init__(self, max_cells=1000, max_bytes=1 << 30, fail_first=0, status=None):
        self.max_cells, self.max_bytes = max_cells, max_bytes
        self.fail_first, self.status = fail_first, status
        self.posts: list[int] = []  # cells of every request
        self.answered: list[int] = []  # cells of every request answered 200

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/atlas":
            return httpx.Response(200, json={"limits": {"max_cells_per_request": self.max_cells,
                                                        "max_request_bytes": self.max_bytes}})
        if self.status is not None:
            return httpx.Response(self.status, json={"detail": "the server says no", "request_id": "r1"})
        if self.fail_first > 0:
            self.fail_first -= 1
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "restarting", "request_id": "r"})
        body = request.read()
        payload = wire.decode_request(body, request.headers["content-type"])
        self.posts.append(payload.n_cells)
        if payload.n_cells > 16:  # the server's real limit is lower than it advertised
            return httpx.Response(413, json={"detail": "too large", "request_id": "r2"})
        self.answered.append(payload.n_cells)
        rna = payload.modalities["RNA"][1]
        protein = payload.modalities["protein"][1].toarray().astype(np.float32)
        result = wire.MapResult(payload.cells, {
            ("obs", "total_pred"): (np.asarray([str(int(v)) for v in rna.sum(axis=1).A1]), None),
            ("obs", "total_confidence"): (np.asarray(rna.sum(axis=1)).ravel().astype(np.float32), None),
            ("obsm", "protein_pred"): (protein, ["CD3", "CD4"]),
        }, {"atlas": {"version": "v1", "n_no_data": 1, "params": payload.params}})
        accept = request.headers.get("accept")
        return httpx.Response(200, content=wire.encode_result(result, accept), headers={"Content-Type": accept})


def _client(server, **kwargs) -> AtlasClient:
    client = AtlasClient("http://atlas.test", "token-0123456789abcdef", backoff_s=0.0, **kwargs)
    client._http = httpx.Client(base_url="http://atlas.test", transport=httpx.MockTransport(server),
                                headers=client._http.headers)
    return client


def test_chunks_split_on_413_and_reassemble_in_order():
    query = _query(50)
    server = Server(max_cells=30)
    out = _client(server, max_cells_per_request=25).map(query, levels=["l1"], predict=[], progress=False)
    # 25-cell chunks (server limit 30), each refused once as too large and split in halves of ≤ 16
    # (the two chunks are in flight together, so only the multiset of requests is fixed).
    assert sorted(server.posts) == [12, 12, 13, 13, 25, 25] and sorted(server.answered) == [12, 12, 13, 13]
    assert list(out.obs_names) == list(query.obs_names) and out.obs_names.name == "barcode"
    expected = np.asarray(query.X.sum(axis=1)).ravel().astype(np.float32)
    assert np.array_equal(out.obs["total_confidence"].to_numpy(), expected)
    assert np.array_equal(out.obsm["protein_pred"].to_numpy(), query.obsm["protein"].to_numpy(np.float32))
    assert out.uns["atlas"]["n_no_data"] == 4  # summed over the 4 answered chunks
    assert out.uns["atlas"]["params"]["levels"] == ["l1"] and out.uns["atlas"]["params"]["predict"] == []


def test_one_chunk_at_a_time_sends_in_order():
    server = Server(max_cells=30)
    _client(server, max_cells_per_request=25, concurrency=1).map(_query(50), levels=["l1"], predict=[], progress=False)
    assert server.posts == [25, 12, 13, 25, 12, 13]


def test_a_body_larger_than_the_advertised_limit_is_split_before_sending():
    query = _query(40)
    ten = wire.QueryPayload([f"c{i}" for i in range(10)], {"RNA": (GENES, query.X[:10])}, {})
    one = len(wire.encode_request(ten, wire.ARROW))
    server = Server(max_bytes=one * 2)
    _client(server, max_cells_per_request=40).map(query, progress=False)
    # Never a body over the advertised limit; what the server still refuses (> 16 cells) is split too.
    assert max(server.posts) <= 20 and sum(server.answered) == 40 and max(server.answered) <= 16


def test_503_is_retried_then_reported():
    query = _query(10)
    server = Server(fail_first=2)
    out = _client(server, retries=3).map(query, progress=False)
    assert out.n_obs == 10
    with pytest.raises(ServiceUnavailableError, match="restarting"):
        _client(Server(fail_first=10), retries=2).map(query, progress=False)


@pytest.mark.parametrize("status,error", [(401, AuthenticationError), (422, RequestRejected), (400, RequestRejected)])
def test_4xx_raise_with_the_servers_message(status, error):
    with pytest.raises(error, match=f"the server says no \\(HTTP {status}\\)") as info:
        _client(Server(status=status)).map(_query(5), progress=False)
    assert info.value.status == status and info.value.request_id == "r1"


def test_bad_parameters_and_empty_queries_fail_before_sending():
    from atlas.mapping import MappingError

    server = Server()
    client = _client(server)
    with pytest.raises(MappingError, match="predict_method must be one of"):  # as map_query says it
        client.map(_query(5), predict_method="magic", progress=False)
    with pytest.raises(MappingError, match="no cells"):
        client.map(_query(5)[:0], progress=False)
    assert server.posts == []
    assert json.loads(json.dumps(wire.MapParams().to_json()))["thresholds"] == "calibrated"


def test_requests_carry_only_the_parameters_that_differ_from_the_defaults():
    """An older service, which lacks a newer parameter, still answers a client that leaves it at
    its default; what a request does ask for reaches the service."""
    server = Server()
    client = _client(server)
    out = client.map(_query(5), k_coarse=7, progress=False)
    assert out.uns["atlas"]["params"] == {"k_coarse": 7}
    assert wire.MapParams().to_request() == {}
    assert wire.MapParams(thresholds=None, levels=["l1"]).to_request() == {"thresholds": None, "levels": ["l1"]}
