"""The mapping service: the offline mapper (:mod:`atlas.mapping`) split over Ray Serve deployments.

* :mod:`atlas.service.config` — the application's arguments (``serve/config.yaml`` ``args:``),
  one typed object with the limits, the token source and the replicas of every deployment.
* :mod:`atlas.service.pipeline` — what the ingress runs per request: ``map_query``'s stages with
  the encoder and the index shards behind callables (Ray-free, so tests run it in-process).
* :mod:`atlas.service.remote` — the searcher over shard deployment handles, with retries.
* :mod:`atlas.service.deployments` — the encoder (``@serve.batch``) and index-shard deployments.
* :mod:`atlas.service.ingress` — the FastAPI ingress (auth, limits, wire format, errors).
* :mod:`atlas.service.app` — ``build_app(args)`` (the Serve builder) and :func:`run_service`
  (what ``atlas serve`` runs).

The wire format is :mod:`atlas.wire`; the client is :mod:`atlas.client`.
"""
