"""The mapping service for real: a local Ray + Serve app on the tiny atlas, real HTTP (httpx).

One Serve application for the whole module (start-up is the slow part). Served results must
equal the offline ``map_query``; every bad input must get its 4xx with the mapper's message;
a killed shard replica must be replaced and the next request must succeed.
"""

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlas import wire

pytestmark = [pytest.mark.ray, pytest.mark.real_data]

LEVELS = ["cell_type_l1", "cell_type_l2"]
TOKEN = "integration-test-token-7d1f0c2a9b"
MAX_BYTES = 4 << 20
MAX_CELLS = 1000


@dataclass
class Service:
    url: str
    token: str
    token_file: Path
    atlas: Any
    query: Any
    proteins: list

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_atlas, tmp_path_factory):
    import ray
    from ray import serve

    from atlas.service.app import APP_NAME, build_app

    atlas, query, proteins = tiny_atlas
    token_file = tmp_path_factory.mktemp("serve") / "token"
    token_file.write_text(TOKEN + "\n")
    if not ray.is_initialized():  # the suite's ray_local (4 logical CPUs) if it is up, else our own
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    port = _free_port()
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    args = {
        "artifact": str(atlas.path), "token_file": str(token_file),
        "max_request_bytes": MAX_BYTES, "max_cells_per_request": MAX_CELLS, "retries": 4,
        "ingress": small, "encoder": {**small, "max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "shards": {"*": small},
        "pack_shards_below": 0,  # one deployment per shard, as a large atlas gets (the tour serves packed)
    }
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        yield Service(f"http://127.0.0.1:{port}", TOKEN, token_file, atlas, query, proteins)
    finally:
        serve.shutdown()
        ray.shutdown()  # later modules start their own (ray_local)


@pytest.fixture(scope="module")
def offline(service):
    """The offline result of the whole query (the reference every served answer must equal). With
    the reference's statistics every cell's result is its own, so any slice of the query sent
    alone must give these rows (the query-statistics contract is tested by the SDK tests)."""
    from atlas.mapping import map_query

    return map_query(service.query, service.atlas, return_neighbors=True, domain_statistics="reference")


def _payload(adata, params=None) -> wire.QueryPayload:
    from atlas.mapping.align import query_matrix, query_modalities

    mods = {}
    for m in query_modalities(adata):
        counts, features = query_matrix(adata, m)
        mods[m] = (features, counts)
    return wire.QueryPayload(list(adata.obs_names), mods, params or {})


def _post(service, body, content_type=wire.ARROW, params=None, headers=None, **kwargs):
    import httpx

    h = {**service.auth, "Content-Type": content_type, **(headers or {})}
    return httpx.post(f"{service.url}/v1/map", content=body, params=params, headers=h, timeout=180, **kwargs)


def _map_http(service, adata, content_type=wire.ARROW, params=None, query=None):
    response = _post(service, wire.encode_request(_payload(adata, params), content_type), content_type, query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(content_type)
    return wire.result_to_anndata(wire.decode_result(response.content, response.headers["content-type"]),
                                  obs_names=adata.obs_names)


def _rows(result, rows: slice):
    """The offline result of a slice of the query (AnnData slicing leaves uns arrays whole)."""
    out = result[rows].copy()
    if "atlas_neighbors" in result.uns:
        out.uns["atlas_neighbors"] = {"dataset_id": result.uns["atlas_neighbors"]["dataset_id"][rows]}
    return out


def assert_same(served, offline, *, neighbours=True):
    """Labels and flags exactly equal; floats equal to 1e-6 (they are computed by the same code)."""
    assert list(served.obs_names) == list(offline.obs_names)
    assert list(served.obs.columns) == list(offline.obs.columns)
    for column in offline.obs.columns:
        a, b = served.obs[column].to_numpy(), offline.obs[column].to_numpy()
        assert a.dtype == b.dtype, column
        if b.dtype == np.float32:
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=column)
        else:
            assert (a == b).all(), column
    assert list(served.obsm.keys()) == list(offline.obsm.keys())
    for key in offline.obsm.keys():
        a, b = served.obsm[key], offline.obsm[key]
        if isinstance(b, pd.DataFrame):
            assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
            a, b = a.to_numpy(), b.to_numpy()
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if b.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=key)
        else:
            assert np.array_equal(a, b), key
    # Which cells shared statistics is a property of how the query was split (a slice of the
    # query is its own batch): compared where it is the point (the SDK tests).
    strip = lambda uns: {k: v for k, v in uns.items() if k != "query_domains"}  # noqa: E731
    assert strip(served.uns["atlas"]) == strip(offline.uns["atlas"])
    if neighbours and "atlas_neighbors" in offline.uns:
        assert np.array_equal(served.uns["atlas_neighbors"]["dataset_id"], offline.uns["atlas_neighbors"]["dataset_id"])


def _assert_problem(response, status, match):
    assert response.status_code == status, response.text
    doc = response.json()
    assert match in doc["detail"], doc["detail"]
    assert doc["request_id"] and response.headers["x-request-id"] == doc["request_id"]
    assert "Traceback" not in response.text and 'File "' not in response.text


# -- open endpoints -----------------------------------------------------------------------------


def test_healthz_docs_and_openapi(service):
    import httpx

    health = httpx.get(f"{service.url}/healthz", timeout=60)
    assert health.status_code == 200 and health.json() == {"status": "ok", "atlas_version": service.atlas.version}
    docs = httpx.get(f"{service.url}/docs", timeout=60)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(f"{service.url}/openapi.json", timeout=60).json()
    assert {"/v1/map", "/v1/atlas", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/map"]["post"]["requestBody"]["content"]
    assert set(body) == set(wire.CONTENT_TYPES)


def test_atlas_info(service):
    import httpx

    info = httpx.get(f"{service.url}/v1/atlas", headers=service.auth, timeout=60).json()
    atlas = service.atlas
    assert info["atlas_version"] == atlas.version
    assert info["levels"] == LEVELS
    coarse = atlas.shard("coarse")
    for level in LEVELS:
        assert info["labels"][level] == sorted(set(coarse.labels[level]) - {""})
    assert info["modalities"] == {"RNA": {"n_features": len(atlas.vocabulary["RNA"])},
                                  "protein": {"n_features": len(service.proteins)}}
    assert info["predictable"] == {"protein": ["knn"]}
    assert info["thresholds"]["calibrated"] == atlas.manifest["mapping"]["thresholds"]
    assert info["limits"] == {"max_request_bytes": MAX_BYTES, "max_cells_per_request": MAX_CELLS,
                              "max_json_request_bytes": MAX_BYTES}
    assert info["layout"]["mode"] == "hierarchy"
    assert [n["name"] for n in info["layout"]["nodes"]] == [n.name for n in atlas.layout.nodes]


# -- auth and limits ----------------------------------------------------------------------------


def test_missing_or_wrong_token_is_401(service):
    import httpx

    body = wire.encode_request(_payload(service.query[:3]), wire.ARROW)
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000000"}, {"Authorization": TOKEN}):
        for response in (httpx.post(f"{service.url}/v1/map", content=body, headers={**headers, "Content-Type": wire.ARROW},
                                    timeout=60),
                         httpx.get(f"{service.url}/v1/atlas", headers=headers, timeout=60)):
            assert response.status_code == 401, response.text
            assert response.headers["www-authenticate"].startswith('Bearer realm="atlas"')
            assert "token" in response.json()["detail"] or "Bearer" in response.json()["detail"]


def test_oversized_bodies_and_too_many_cells_are_413(service):
    # Refused from Content-Length, before the body is read.
    _assert_problem(_post(service, b"\0" * (MAX_BYTES + 1)), 413, f"at most {MAX_BYTES} bytes")
    response = _post(service, b"\0" * (MAX_BYTES + 1))
    assert "split the query" in response.json()["detail"].lower() and "AtlasClient" in response.json()["detail"]

    # A chunked upload (no Content-Length) is cut off while reading.
    def chunks():
        for _ in range(MAX_BYTES // (1 << 16) + 2):
            yield b"\0" * (1 << 16)

    _assert_problem(_post(service, chunks()), 413, f"at most {MAX_BYTES} bytes")

    # More cells than allowed, in a small body (few counts per cell).
    n = MAX_CELLS + 1
    genes = list(service.atlas.vocabulary["RNA"])
    counts = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), np.zeros(n, int))), shape=(n, len(genes)))
    payload = wire.QueryPayload([f"c{i}" for i in range(n)], {"RNA": (genes, counts)}, {})
    _assert_problem(_post(service, wire.encode_request(payload, wire.ARROW)), 413,
                    f"holds {n} cells; this server maps at most {MAX_CELLS} cells per request")


# -- mapping = offline --------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [wire.ARROW, wire.NPZ])
def test_served_equals_offline(service, offline, content_type):
    served = _map_http(service, service.query, content_type, {"return_neighbors": True,
                                                               "domain_statistics": "reference"})
    assert_same(served, offline)
    # Hierarchy: every level-2 label lies under its level-1 label.
    shard = service.atlas.shard("coarse")
    parent = dict(zip(shard.labels["cell_type_l2"], shard.labels["cell_type_l1"]))
    for l1, l2 in zip(served.obs["cell_type_l1_pred"], served.obs["cell_type_l2_pred"]):
        assert l2 == "unknown" or parent[l2] == l1
    assert not served.obs["cell_type_l1_unknown"].all()
    assert list(served.obsm["protein_pred"].columns) == service.proteins
    # The shard replicas searched their profile index: proteins pooled in the profile space.
    assert served.uns["atlas"]["profile_neighbours"] == "embedding+pca"


def test_json_request_and_accept_header(service, offline):
    import httpx

    cells = service.query[:4]
    served = _map_http(service, cells, wire.JSON, {"return_neighbors": True})
    assert_same(served, _rows(offline, slice(0, 4)))
    # Arrow in, JSON out.
    body = wire.encode_request(_payload(cells, {"return_neighbors": True}), wire.ARROW)
    response = httpx.post(f"{service.url}/v1/map", content=body, timeout=120,
                          headers={**service.auth, "Content-Type": wire.ARROW, "Accept": wire.JSON})
    assert response.status_code == 200 and response.headers["content-type"].startswith(wire.JSON)
    again = wire.result_to_anndata(wire.decode_result(response.content, wire.JSON), obs_names=cells.obs_names)
    assert_same(again, served)


def test_thresholds_levels_and_predict_as_query_params(service):
    from atlas.mapping import map_query

    cells = service.query[:30]
    served = _map_http(service, cells, query={"thresholds": "1.01"})
    for level in LEVELS:
        assert served.obs[f"{level}_unknown"].all() and (served.obs[f"{level}_pred"] == "unknown").all()
    served = _map_http(service, cells, query={"levels": "cell_type_l1", "predict": "none", "k_coarse": "10"})
    assert list(served.obs.columns) == ["cell_type_l1_pred", "cell_type_l1_confidence", "cell_type_l1_unknown"]
    assert "protein_pred" not in served.obsm
    assert_same(served, map_query(cells, service.atlas, levels=["cell_type_l1"], predict=[], k_coarse=10))


def test_concurrent_requests_share_encoder_batches(service):
    """Requests embedded together by the encoder keep their own query statistics (each request
    names itself one batch): every answer equals map_query of that request's cells alone."""
    from atlas.mapping import map_query

    results: dict = {}
    params = {"return_neighbors": True, "min_domain_cells": 10, "batch": "request"}

    def one(i):
        rows = slice(20 * i, 20 * i + 20)
        results[i] = (_map_http(service, service.query[rows], params=params), rows)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for served, rows in results.values():
        assert_same(served, map_query(service.query[rows].copy(), service.atlas, **params))
        assert served.uns["atlas"]["query_domains"]["batches"]["request"]["own_statistics"]


# -- bad input: 4xx with the mapper's message, never a 500 --------------------------------------


def _with_genes(service, genes, values=None):
    n = 5
    x = service.query[:n].X
    x = sp.csr_matrix(x if values is None else values(x))
    return wire.QueryPayload([f"c{i}" for i in range(n)], {"RNA": (list(genes), x)}, {})


@pytest.mark.parametrize("case,status,match", [
    ("garbage_arrow", 400, "not a readable Arrow IPC stream"),
    ("garbage_json", 400, "not valid JSON"),
    ("unknown_content_type", 415, "unsupported content type 'text/csv'"),
    ("bad_param", 400, "k_coarse must be an integer"),
    ("unknown_genes", 422, "the query has 0 of the atlas's 4000 RNA features"),
    ("non_integer", 422, "not raw counts"),
    ("mouse", 422, "look mouse but atlas"),
    ("unknown_level", 422, "no label level(s) ['cell_type_l9']"),
    ("decoder_on_concerto", 422, "cannot predict protein with the decoder"),
])
def test_bad_input_is_4xx_with_the_mappers_message(service, case, status, match):
    genes = list(service.atlas.vocabulary["RNA"])
    content_type, query = wire.ARROW, None
    if case == "garbage_arrow":
        body = b"\x89garbage" * 100
    elif case == "garbage_json":
        body, content_type = b"{cells: [", wire.JSON
    elif case == "unknown_content_type":
        body, content_type = b"a,b\n1,2", "text/csv"
    elif case == "bad_param":
        body, query = wire.encode_request(_with_genes(service, genes), wire.ARROW), {"k_coarse": "many"}
    elif case == "unknown_genes":
        body = wire.encode_request(_with_genes(service, [f"NOT_A_GENE_{i}" for i in range(len(genes))]), wire.ARROW)
    elif case == "non_integer":
        body = wire.encode_request(_with_genes(service, genes, lambda x: sp.csr_matrix(x) * 0.37), wire.ARROW)
    elif case == "mouse":
        mouse = [g[:1] + g[1:].lower() for g in genes]
        body = wire.encode_request(_with_genes(service, mouse), wire.ARROW)
    elif case == "unknown_level":
        body, query = wire.encode_request(_with_genes(service, genes), wire.ARROW), {"levels": "cell_type_l9"}
    elif case == "decoder_on_concerto":
        body, query = wire.encode_request(_with_genes(service, genes), wire.ARROW), {
            "predict": "protein", "predict_method": "decoder"}
    _assert_problem(_post(service, body, content_type, query), status, match)


def test_deeply_nested_json_is_400(service):
    body = b"[" * 100_000 + b"]" * 100_000  # was a 500: the parser's recursion limit
    _assert_problem(_post(service, body, wire.JSON), 400, "nested too deeply")


def test_a_cell_with_no_counts_maps_to_unknown_over_http(service):
    """A 2-cell JSON request whose second cell is all zeros got a 500."""
    cells = service.query[:2].copy()
    x = sp.csr_matrix(cells.X).tolil()
    x[1] = 0
    cells.X = x.tocsr()
    served = _map_http(service, cells, wire.JSON)
    for level in LEVELS:
        assert served.obs[f"{level}_pred"].iloc[1] == "unknown" and served.obs[f"{level}_confidence"].iloc[1] == 0
        assert served.obs[f"{level}_pred"].iloc[0] != "unknown" or served.obs[f"{level}_confidence"].iloc[0] > 0
    assert served.uns["atlas"]["n_no_data"] == 1


# -- the SDK and the CLI -----------------------------------------------------------------------


def _counting_posts(client) -> list[int]:
    posts = []
    send = client._http.request

    def counting(method, path, **kwargs):
        if path == "/v1/map":
            posts.append(len(kwargs["content"]))
        return send(method, path, **kwargs)

    client._http.request = counting
    return posts


def test_sdk_maps_in_chunks_like_offline(service):
    from atlas.client import AtlasClient
    from atlas.mapping import map_query

    query = service.query.copy()
    query.obs_names.name = "barcode"
    offline_result = map_query(query, service.atlas, levels=LEVELS, predict=["protein"],
                               domain_statistics="reference")
    with AtlasClient(service.url, service.token, max_cells_per_request=70) as client:
        posts = _counting_posts(client)
        served = client.map(query, levels=LEVELS, predict=["protein"], domain_statistics="reference", progress=True)
    assert len(posts) >= 3
    assert_same(served, offline_result)
    assert served.obs_names.name == "barcode"
    # Every request's stages, the server's from its Server-Timing header.
    assert len(client.timings) == len(posts)
    server = ["server.receive", "server.decode", "server.prepare", "server.embed", "server.labels",
              "server.profiles", "server.assemble", "server.encode", "server.total"]
    for timing in client.timings:
        assert set(timing) == {"encode", "request", "decode", "server.encoder", *server}
        assert all(v >= 0 for v in timing.values())
        assert sum(timing[s] for s in server[:-1]) <= timing["server.total"] + 0.01 < timing["request"] + 0.01
        assert timing["server.encoder"] <= timing["server.embed"] + 0.01  # the model's share of the hop
    assert served.uns["atlas"]["n_no_data"] == offline_result.uns["atlas"]["n_no_data"]


def test_sdk_sends_each_batch_whole_and_equals_offline(service):
    """Each query batch is normalised by its own statistics: the client sends a batch in requests
    of its own, so served == offline with the same batch_key, cells interleaved or not."""
    from atlas.client import AtlasClient
    from atlas.mapping import map_query

    query = service.query.copy()
    n = query.n_obs
    query.obs["sample"] = np.where(np.arange(n) % 3 == 0, "s1", "s2")  # interleaved rows
    query.obs.loc[query.obs_names[:8], "sample"] = "tiny"  # below min_domain_cells: the reference average
    options = dict(levels=LEVELS, predict=["protein"], batch_key="sample", min_domain_cells=40)
    offline_result = map_query(query, service.atlas, **options)
    with AtlasClient(service.url, service.token, max_cells_per_request=70) as client:
        posts = _counting_posts(client)
        served = client.map(query, progress=False, **options)
    assert len(posts) == 3  # s1, s2 whole; "tiny" with the reference average
    assert_same(served, offline_result)
    domains = offline_result.uns["atlas"]["query_domains"]
    assert served.uns["atlas"]["query_domains"] == domains
    assert {b: v["own_statistics"] for b, v in domains["batches"].items()} == {"s1": True, "s2": True, "tiny": False}
    # A batch's result does not depend on the other batches mapped with it.
    alone = map_query(query[query.obs["sample"] == "s1"].copy(), service.atlas, **options)
    np.testing.assert_allclose(alone.obsm["X_atlas"], offline_result[alone.obs_names].obsm["X_atlas"], atol=1e-5)


def test_sdk_errors_carry_the_servers_message(service):
    from atlas.client import AtlasClient, AuthenticationError, RequestRejected

    with AtlasClient(service.url, "wrong-token-0000000000000000") as client, \
            pytest.raises(AuthenticationError, match="invalid bearer token"):
        client.info()
    with AtlasClient(service.url, service.token) as client:
        with pytest.raises(RequestRejected, match=r"no label level\(s\) \['nope'\]") as err:
            client.map(service.query[:5], levels=["nope"], progress=False)
        assert err.value.status == 422


def test_cli_map_url_and_atlas_give_identical_files(service, tmp_path):
    import anndata as ad
    from typer.testing import CliRunner

    from atlas.cli import app

    query_path = tmp_path / "query.h5ad"
    service.query[:90].copy().write_h5ad(query_path)
    runner = CliRunner()
    common = ["--levels", "cell_type_l1,cell_type_l2", "--predict", "protein", "--predict-method", "knn", "--no-progress"]
    served = runner.invoke(app, ["map", str(query_path), "-o", str(tmp_path / "served.h5ad"), "--url", service.url,
                                 "--token-file", str(service.token_file), "--max-cells-per-request", "40", *common])
    assert served.exit_code == 0, served.output
    local = runner.invoke(app, ["map", str(query_path), "-o", str(tmp_path / "offline.h5ad"),
                                "--atlas", str(service.atlas.path), *common])
    assert local.exit_code == 0, local.output
    assert "mapped 90 cells" in served.output
    a, b = ad.read_h5ad(tmp_path / "served.h5ad"), ad.read_h5ad(tmp_path / "offline.h5ad")
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=False, atol=1e-6)
    for key in b.obsm.keys():
        np.testing.assert_allclose(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]), atol=1e-6, rtol=0)
    assert json.dumps(_plain(a.uns), sort_keys=True) == json.dumps(_plain(b.uns), sort_keys=True)
    # Bad input: one line, non-zero exit.
    wrong = runner.invoke(app, ["map", str(query_path), "-o", str(tmp_path / "x.h5ad"), "--url", service.url,
                                "--token", "wrong-token-0000000000000000", "--no-progress"])
    assert wrong.exit_code == 2 and "invalid bearer token" in wrong.output


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# -- resilience (last: it kills a replica) -------------------------------------------------------


def _replica_actors(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"])


def _deployment_running(deployment: str) -> bool:
    from ray import serve

    from atlas.service.app import APP_NAME

    status = serve.status().applications[APP_NAME].deployments[deployment]
    return str(status.status).endswith("HEALTHY") and status.replica_states.get("RUNNING", 0) >= 1


def test_killed_shard_replica_is_replaced_and_the_next_request_succeeds(service, offline):
    import ray

    (victim,) = _replica_actors("shard-coarse")
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    # In flight during the restart: served through the retries, or a clear 503.
    cells = service.query[:25]
    response = _post(service, wire.encode_request(_payload(cells, {"return_neighbors": True}), wire.ARROW))
    print(f"request sent right after the kill: HTTP {response.status_code}")
    if response.status_code == 200:
        got = wire.result_to_anndata(wire.decode_result(response.content, wire.ARROW), obs_names=cells.obs_names)
        assert_same(got, _rows(offline, slice(0, 25)))
    else:
        _assert_problem(response, 503, "unavailable")
        assert int(response.headers["retry-after"]) > 0

    deadline = time.monotonic() + 180  # a bound on waiting, not a timing assertion
    while not (_replica_actors("shard-coarse") not in ([], [victim]) and _deployment_running("shard-coarse")):
        assert time.monotonic() < deadline, "Serve did not replace the killed shard replica"
        time.sleep(1)
    assert_same(_map_http(service, cells, params={"return_neighbors": True}), _rows(offline, slice(0, 25)))
