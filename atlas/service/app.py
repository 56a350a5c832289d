"""Build the mapping application (``serve run serve/config.yaml``) and run it locally (``atlas serve``).

``build_app(args)`` is the Serve application builder: one index-shard deployment per shard of
the atlas's layout (or one for all of a small atlas's shards), the encoder, and the ingress that
composes them through handles.

No ``from __future__ import annotations`` here: Ray Serve validates ``args:`` against the
builder's parameter annotation, which must be the class itself, not a string.
"""

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union, cast

from ray.serve import Application

from atlas.service.config import ServiceArgs, local_num_cpus, shard_deployment_names
from atlas.stopping import rearm

log = logging.getLogger(__name__)

#: The Serve application's name (``serve status`` shows it).
APP_NAME = "atlas"


def build_app(args: ServiceArgs) -> Application:
    """The mapping application for ``args`` (a :class:`ServiceArgs` or its dict)."""
    from atlas.artifact import ArtifactError, read_manifest
    from atlas.index.shards import ShardLayout
    from atlas.service.auth import load_tokens
    from atlas.service.deployments import Encoder, IndexShard
    from atlas.service.ingress import make_ingress

    if not isinstance(args, ServiceArgs):
        args = ServiceArgs.model_validate(args)
    artifact = str(Path(args.artifact).expanduser().resolve())
    manifest = read_manifest(artifact)  # replicas verify the files they load; fail early on a non-atlas
    if not manifest.get("shards"):
        raise ArtifactError(f"atlas {artifact} has no index shards; rebuild it with index levels")
    if args.token_file:  # check where we can (the ingress re-reads it where it runs)
        load_tokens(args.token_file, args.token_env)
    layout = ShardLayout.read((Path(artifact) / manifest["shards"]).parent)
    names = shard_deployment_names(layout.shard_names())

    if args.packs_shards(layout.root.n_cells):
        packed = IndexShard.options(  # type: ignore[attr-defined]  # Serve deployment class
            name="shards", **args.shard_options("*").serve_options()).bind(
            artifact, layout.shard_names(), args.shard_use_gpu)
        shards = {shard: packed for shard in layout.shard_names()}
    else:
        shards = {
            shard: IndexShard.options(  # type: ignore[attr-defined]  # Serve deployment class
                name=names[shard], **args.shard_options(shard).serve_options())
            .bind(artifact, shard, args.shard_use_gpu)
            for shard in layout.shard_names()
        }
    enc = args.encoder_options()
    encoder = Encoder.options(**enc.serve_options()).bind(  # type: ignore[attr-defined]  # Serve deployment class
        artifact, enc.max_batch_size, enc.batch_wait_timeout_s, enc.batch_cells, enc.device)
    ingress_options = args.ingress_options()
    # The ingress gets the validated arguments themselves (no second set of defaults there).
    resolved = args.model_copy(update={
        "token_file": str(Path(args.token_file).expanduser().resolve()) if args.token_file else None})
    threads = ingress_options.max_ongoing_requests or 8
    return make_ingress().options(**ingress_options.serve_options()).bind(artifact, encoder, shards, resolved, threads)


def run_service(args: Union[ServiceArgs, Dict[str, Any]], *, host: str = "127.0.0.1", port: int = 8000,
                address: Optional[str] = None, blocking: bool = True,
                log_line: Callable[[str], None] = print) -> Optional[str]:
    """Start Ray (local unless ``address``), deploy the app on ``host:port``, and block until
    Ctrl-C, then shut Serve and the local Ray down. With ``blocking=False``, return the URL."""
    import ray
    from ray import serve

    from atlas.artifact import read_manifest
    from atlas.index.shards import ShardLayout

    if not isinstance(args, ServiceArgs):
        args = cast(ServiceArgs, ServiceArgs.model_validate(args))  # mypy skips pydantic: Any otherwise
    started = False
    if not ray.is_initialized():
        if address is None:
            manifest = read_manifest(args.artifact)
            layout = ShardLayout.read((Path(args.artifact) / (manifest.get("shards") or "shards/layout.json")).parent) \
                if manifest.get("shards") else None
            cpus = local_num_cpus(args, layout.shard_names() if layout else [], os.cpu_count() or 1,
                                  packed=layout is not None and args.packs_shards(layout.root.n_cells))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
        else:
            ray.init(address=address, configure_logging=False)
        started = True
        rearm()  # ray.init replaced the SIGTERM handler of `atlas serve` with sys.exit
    stopped = False
    try:
        app = build_app(args)
        serve.start(http_options={"host": host, "port": port})
        log_line(f"deploying the mapping service for {args.artifact} (this takes a little while)…")
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        log_line(f"atlas mapping service ready at {url}  (docs: {url}/docs; Ctrl-C stops it)")
        if not blocking:
            return url
        while True:
            time.sleep(1)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM under atlas.stopping.stop_on_signals
        stopped = True
        log_line(f"{getattr(stop, 'signal_name', 'SIGINT')}: stopping the mapping service…")
        raise
    finally:
        if blocking or stopped or sys.exc_info()[0] is not None:
            _shutdown(serve, ray, started)


def _shutdown(serve, ray, started: bool) -> None:
    """Serve down, then the Ray this process started (a joined cluster keeps running)."""
    try:
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
