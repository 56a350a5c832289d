"""The mapping service's Ray-free parts: the ingress pipeline (same stages as map_query), the
application arguments, token authentication and the retry classification."""

import numpy as np
import pandas as pd
import pytest

from atlas.service.auth import AuthConfigError, check_authorization, load_tokens
from atlas.service.config import ServiceArgs, shard_deployment_names
from atlas.wire import MapParams, QueryPayload

TOKEN = "s3cret-token-0123456789"


# -- the pipeline the ingress runs ----------------------------------------------------------


def _pipeline(atlas):
    from atlas.mapping.embedding import local_embed
    from atlas.mapping.search import LocalSearcher, describe_shard
    from atlas.service.pipeline import MappingPipeline, root_info

    root = root_info([describe_shard(atlas.shard(n)) for n in atlas.layout.root.shards])
    return MappingPipeline(atlas, root), local_embed(atlas.model(), atlas.manifest, heads=atlas.heads()), LocalSearcher(atlas)


def _as_payload(adata) -> QueryPayload:
    from atlas.mapping.align import query_matrix, query_modalities

    mods = {}
    for m in query_modalities(adata):
        counts, features = query_matrix(adata, m)
        mods[m] = (features, counts)
    return QueryPayload(list(adata.obs_names), mods, {})


@pytest.mark.real_data
@pytest.mark.parametrize("params", [
    MapParams(return_neighbors=True),
    MapParams(levels=["cell_type_l1"], predict=[], thresholds=None, k_coarse=10),
    MapParams(thresholds={"cell_type_l2": 1.01}, k_fine=3),
])
def test_pipeline_equals_map_query(tiny_atlas, params):
    """Decoded wire payload → pipeline (local model + local shards) == map_query, exactly."""
    from atlas.mapping import map_query
    from atlas.wire import ARROW, decode_request, encode_request

    atlas, query, _ = tiny_atlas
    query = query[:60].copy()
    pipeline, embed, searcher = _pipeline(atlas)
    payload = decode_request(encode_request(_as_payload(query), ARROW), ARROW)
    served = pipeline.map(payload.to_anndata(), pd.Index(payload.cells), params, embed, searcher)
    offline = map_query(query, atlas, **params.to_json())
    pd.testing.assert_frame_equal(served.obs, offline.obs, check_exact=True)
    assert list(served.obsm.keys()) == list(offline.obsm.keys())
    for key in offline.obsm.keys():
        a, b = served.obsm[key], offline.obsm[key]
        if isinstance(b, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        else:
            assert a.dtype == b.dtype and np.array_equal(a, b), key
    assert served.uns["atlas"] == offline.uns["atlas"]


@pytest.mark.real_data
def test_pipeline_info_and_user_errors(tiny_atlas):
    from atlas.mapping import MappingError

    atlas, query, proteins = tiny_atlas
    pipeline, embed, searcher = _pipeline(atlas)
    assert pipeline.levels == ["cell_type_l1", "cell_type_l2"]
    assert pipeline.predictable() == {"protein": ["knn"]}
    assert pipeline.root.profiles["protein"] == proteins
    assert "CD4 T" in pipeline.root.labels["cell_type_l1"] and "" not in pipeline.root.labels["cell_type_l1"]
    small = query[:5].copy()
    with pytest.raises(MappingError, match=r"no label level\(s\) \['cell_type_l9'\]"):
        pipeline.map(small, small.obs_names, MapParams(levels=["cell_type_l9"]), embed, searcher)
    with pytest.raises(MappingError, match="stores no ATAC profiles"):
        pipeline.map(small, small.obs_names, MapParams(predict=["ATAC"]), embed, searcher)


# -- arguments ------------------------------------------------------------------------------


def test_service_args_patterns_and_defaults():
    args = ServiceArgs.model_validate({
        "artifact": "/data/a",
        "shards": {"*": {"ray_actor_options": {"num_cpus": 0.5}},
                   "fine/*": {"num_replicas": 2},
                   "coarse": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}},
        "encoder": {"max_batch_size": 32},
    })
    assert args.shard_options("fine/B").serve_options() == {
        "num_replicas": 2, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.5}}
    coarse = args.shard_options("coarse").serve_options()
    assert "num_replicas" not in coarse and coarse["autoscaling_config"]["max_replicas"] == 4
    encoder = args.encoder_options()
    assert encoder.max_batch_size == 32 and encoder.max_ongoing_requests >= 32
    assert "max_batch_size" not in encoder.serve_options()


def test_service_args_refuse_unknown_keys_and_starving_batches():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="replicas"):
        ServiceArgs.model_validate({"artifact": "a", "replicas": 3})
    with pytest.raises(ValidationError, match="must be ≥ max_batch_size"):
        ServiceArgs.model_validate({"artifact": "a", "encoder": {"max_batch_size": 16, "max_ongoing_requests": 4}})


def test_a_small_atlas_packs_its_shards_into_one_deployment_unless_shards_are_set_apart():
    from atlas.service.config import local_num_cpus

    default = ServiceArgs.model_validate({"artifact": "a"})
    assert default.packs_shards(2_000) and not default.packs_shards(200_000)
    assert not ServiceArgs.model_validate({"artifact": "a", "pack_shards_below": 0}).packs_shards(10)
    apart = ServiceArgs.model_validate({"artifact": "a", "shards": {"fine/*": {"num_replicas": 2}}})
    assert not apart.packs_shards(10)
    names = ["coarse", "fine/B", "fine/T", "fine/NK"]
    # ingress 0.5 + encoder 2 + shards 0.25 each, or 0.25 once when packed
    assert default.required_cpus(names) == pytest.approx(2.5 + 4 * 0.25)
    assert default.required_cpus(names, packed=True) == pytest.approx(2.5 + 0.25)
    assert local_num_cpus(default, names, 2, packed=True) == 3


def test_shard_deployment_names_are_unique_and_slash_free():
    names = shard_deployment_names(["coarse", "fine/B", "fine/B/x", "fine/B.x", "hash/0"])
    assert names["fine/B"] == "shard-fine.B"
    assert len(set(names.values())) == 5
    assert not any("/" in n or "#" in n for n in names.values())


def test_builder_annotation_is_the_args_class():
    """Serve validates `args:` only when the builder's annotation is a class (not a string)."""
    import inspect

    from atlas.service.app import build_app

    (param,) = inspect.signature(build_app).parameters.values()
    assert param.annotation is ServiceArgs


# -- auth -----------------------------------------------------------------------------------


def test_tokens_from_file_env_or_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("ATLAS_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text(f"# rotated monthly\n{TOKEN}\n{TOKEN[::-1]}\n")
    tokens = load_tokens(str(path))
    assert check_authorization(f"Bearer {TOKEN}", tokens) is None
    assert check_authorization(f"bearer {TOKEN[::-1]}", tokens) is None
    assert check_authorization("Bearer nope", tokens) == "invalid bearer token"
    assert "missing bearer token" in check_authorization(None, tokens)
    assert "must be 'Bearer <token>'" in check_authorization(f"Basic {TOKEN}", tokens)
    with pytest.raises(AuthConfigError, match="no bearer token configured"):
        load_tokens(None)
    monkeypatch.setenv("ATLAS_TOKEN", TOKEN)
    assert load_tokens(None) == [TOKEN.encode()]
    monkeypatch.delenv("ATLAS_TOKEN")
    assert load_tokens(None, allow_anonymous=True) is None
    assert check_authorization(None, None) is None
    path.write_text("short\n")
    with pytest.raises(AuthConfigError, match="shorter than 16"):
        load_tokens(str(path))
    with pytest.raises(AuthConfigError, match="cannot read the token file"):
        load_tokens(str(tmp_path / "absent"))


# -- retries --------------------------------------------------------------------------------


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, timeout_s=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def test_gather_retries_dead_replicas_then_gives_up():
    from ray.exceptions import ActorDiedError

    from atlas.service.remote import RetryPolicy, ServiceUnavailable, gather

    policy = RetryPolicy(retries=2, backoff_s=0.0)
    outcomes = iter([ActorDiedError(), "ok"])
    assert gather("shard", [lambda: _Response(next(outcomes))], policy) == ["ok"]
    with pytest.raises(ServiceUnavailable, match="shard is unavailable"):
        gather("shard", [lambda: _Response(ActorDiedError())], policy)
    with pytest.raises(KeyError):  # the deployment's own error: not retried
        gather("shard", [lambda: _Response(KeyError("bug"))], policy)
    with pytest.raises(ServiceUnavailable, match="did not answer within"):
        gather("shard", [lambda: _Response(TimeoutError())], policy)


# -- the ingress's HTTP error handling (a plain FastAPI app, no Serve) ----------------------


def _app_with_error_handling():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from atlas.service.ingress import Problem, install_error_handling, read_body

    app = FastAPI()
    install_error_handling(app)

    @app.get("/bug")
    async def bug():
        raise RuntimeError("secret internal detail at /srv/atlas/x.py line 3")

    @app.get("/teapot")
    async def teapot():
        raise Problem(418, "short and stout", {"X-Hint": "tea"})

    @app.post("/echo")
    async def echo(request: Request):
        return {"n": len(await read_body(request, 1000))}

    return TestClient(app, raise_server_exceptions=False)


def test_unexpected_errors_are_a_short_500_with_a_request_id():
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    client = _app_with_error_handling()
    records = Records()
    logger = logging.getLogger("ray.serve")  # Serve's replica log (it does not propagate to root)
    logger.addHandler(records)
    try:
        response = client.get("/bug")
    finally:
        logger.removeHandler(records)
    assert response.status_code == 500
    doc = response.json()
    assert doc["detail"].startswith("internal error (request id ") and doc["request_id"] in doc["detail"]
    assert "secret internal detail" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] == doc["request_id"]
    # The traceback is in the server's log, under the same request id.
    assert any(doc["request_id"] in r.getMessage() and r.exc_info for r in records.records)
    teapot = client.get("/teapot", headers={"X-Request-ID": "abc-123"})
    assert teapot.status_code == 418 and teapot.json() == {"detail": "short and stout", "request_id": "abc-123"}
    assert teapot.headers["x-hint"] == "tea"


def test_body_limit_from_content_length_and_while_reading():
    client = _app_with_error_handling()
    assert client.post("/echo", content=b"x" * 1000).json() == {"n": 1000}
    too_big = client.post("/echo", content=b"x" * 1001)
    assert too_big.status_code == 413 and "1001 bytes; this server accepts at most 1000 bytes" in too_big.json()["detail"]
    assert "AtlasClient" in too_big.json()["detail"]
    chunked = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length
    assert chunked.status_code == 413 and "at most 1000 bytes" in chunked.json()["detail"]


@pytest.mark.real_data
def test_a_packed_shard_replica_answers_for_each_of_its_shards(tiny_atlas):
    from atlas.mapping.search import describe_shard, search_shard
    from atlas.service.deployments import IndexShard

    atlas, _, _ = tiny_atlas
    names = atlas.shard_names()
    replica = IndexShard.func_or_class(str(atlas.path), names)  # the class Serve runs, in this process
    queries = atlas.shard("coarse").index.reconstruct_n(0, 3)
    for name in names[:3]:
        got, expected = replica.search(queries, 5, shard=name), search_shard(atlas.shard(name), queries, 5)
        np.testing.assert_array_equal(got.position, expected.position)
        assert replica.describe(name)["name"] == describe_shard(atlas.shard(name))["name"] == name
    with pytest.raises(KeyError, match="serves shard"):
        replica.search(queries, 5)  # several shards: the call must name one
    replica.check_health()
    single = IndexShard.func_or_class(str(atlas.path), "coarse")
    assert single.describe()["name"] == "coarse"
