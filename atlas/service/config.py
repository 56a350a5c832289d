"""The mapping service's arguments: what ``serve/config.yaml`` passes as ``args:``.

One typed object (pydantic, unknown keys refused) holds the artifact, where the bearer token
comes from, the request limits, and the Serve options of every deployment. Ray Serve validates
``args:`` against it before building the application (``atlas.service.app.build_app``).

Shard replicas are set per shard: ``shards`` maps a shard-name pattern (``fnmatch``: ``"*"``,
``"coarse"``, ``"fine/*"``, ``"hash/3"``) to Serve options; every pattern that matches a shard
applies, in the order written, so put the general patterns first::

    shards:
      "*":      {num_replicas: 1, ray_actor_options: {num_cpus: 0.5}}
      coarse:   {autoscaling_config: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 4}}
      "fine/T*": {num_replicas: 2}
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

MiB = 1 << 20


class DeploymentOptions(BaseModel):
    """The Serve options of one deployment (unset = Serve's default or the pattern above)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: PositiveInt | None = None
    max_queued_requests: int | None = None
    ray_actor_options: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None

    def merged(self, *overrides: DeploymentOptions) -> DeploymentOptions:
        """These options updated by ``overrides`` in order (``ray_actor_options`` merged key by key;
        an override that sets ``autoscaling_config`` without ``num_replicas`` drops a fixed count)."""
        out = self.model_dump(exclude_none=True)
        for o in overrides:
            values = o.model_dump(exclude_none=True)
            if "autoscaling_config" in values and "num_replicas" not in values:
                out.pop("num_replicas", None)
            if "ray_actor_options" in values:
                values["ray_actor_options"] = {**out.get("ray_actor_options", {}), **values["ray_actor_options"]}
            out.update(values)
        return type(self)(**out)

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        return self.model_dump(exclude_none=True, include=set(DeploymentOptions.model_fields))


class EncoderOptions(DeploymentOptions):
    """The encoder deployment: Serve options plus how it batches requests."""

    max_batch_size: PositiveInt = 8
    """Most requests embedded together (``@serve.batch``)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a request waits for others to share its batch."""
    batch_cells: PositiveInt = 1024
    """Cells per forward pass of the model (bounds the encoder's memory)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: the GPU when the replica has one (give it ``ray_actor_options: {num_gpus: 1}``)."""

    @model_validator(mode="after")
    def _batching_needs_concurrency(self) -> EncoderOptions:
        # A replica takes at most max_ongoing_requests requests at once: fewer than a batch and
        # batches never fill (every request waits the full timeout).
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"encoder max_ongoing_requests ({self.max_ongoing_requests}) must be ≥ "
                             f"max_batch_size ({self.max_batch_size}), or batches never fill")
        return self


def _ingress_default() -> DeploymentOptions:
    return DeploymentOptions(num_replicas=1, max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.5})


def _encoder_default() -> EncoderOptions:
    # Ray gives an actor as many torch threads as CPUs: the model is the costly step (two CPUs
    # embed 10k cells in 6.6 s vs 8.4 s with one on the benchmark machine; benchmarks/serve.py).
    return EncoderOptions(num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 2})


def _shards_default() -> dict[str, DeploymentOptions]:
    return {"*": DeploymentOptions(num_replicas=1, max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25})}


class ServiceArgs(BaseModel):
    """Arguments of the mapping application (``serve/config.yaml`` ``args:``)."""

    model_config = ConfigDict(extra="forbid")

    artifact: str
    """The atlas artifact folder (on KubeRay: under the shared volume, e.g. /data/atlas/artifacts/x)."""
    token_file: str | None = None
    """File with the bearer token (one per line accepts several, for rotation)."""
    token_env: str = "ATLAS_TOKEN"
    """Environment variable with the token, used when ``token_file`` is not set."""
    allow_anonymous: bool = False
    """Serve without a token (only for a service nobody else can reach)."""
    max_request_bytes: PositiveInt = 64 * MiB
    """Largest request body; larger ones get 413 (the SDK splits queries to stay below it)."""
    max_cells_per_request: PositiveInt = 10_000
    """Most cells in one request (413 above it)."""
    call_timeout_s: float = Field(120.0, gt=0)
    """How long the ingress waits for the encoder or a shard per call."""
    retries: int = Field(3, ge=0)
    """Retries of an encoder/shard call whose replica died or is restarting."""
    retry_after_s: PositiveInt = 5
    """``Retry-After`` of a 503 (a replica still restarting after the retries)."""
    shard_use_gpu: bool = False
    """Search shards on a GPU (give the shard replicas ``num_gpus`` too)."""
    ingress: DeploymentOptions = Field(default_factory=_ingress_default)
    encoder: EncoderOptions = Field(default_factory=_encoder_default)
    shards: dict[str, DeploymentOptions] = Field(default_factory=_shards_default)
    """Shard-name pattern → Serve options (see the module docstring)."""
    pack_shards_below: int = Field(200_000, ge=0)
    """An atlas of fewer reference cells serves all its shards from one deployment (``shards``,
    with the ``"*"`` options): one replica process instead of one per shard (a 2,000-cell atlas
    has ~8 shards; each process costs ~0.3 GB and seconds of start-up). Not when ``shards`` sets
    options for particular shards. 0: one deployment per shard always."""

    def packs_shards(self, n_cells: int) -> bool:
        """Whether an atlas of ``n_cells`` reference cells gets one packed shard deployment."""
        return n_cells < self.pack_shards_below and set(self.shards) <= {"*"}

    def ingress_options(self) -> DeploymentOptions:
        return _ingress_default().merged(self.ingress)

    def encoder_options(self) -> EncoderOptions:
        base = _encoder_default()
        if self.encoder.max_ongoing_requests is None:  # room for two batches unless told otherwise
            base.max_ongoing_requests = max(base.max_ongoing_requests or 0, 2 * self.encoder.max_batch_size)
        return base.merged(self.encoder)  # type: ignore[return-value]

    def shard_options(self, shard_name: str) -> DeploymentOptions:
        """The options of one shard: the defaults, then every matching pattern in order."""
        matching = [o for pattern, o in self.shards.items() if fnmatch.fnmatchcase(shard_name, pattern)]
        return _shards_default()["*"].merged(*matching)

    def required_cpus(self, shard_names: list[str], packed: bool = False) -> float:
        """Logical CPUs the fixed replicas reserve (autoscaled ones count their minimum)."""

        def cpus(o: DeploymentOptions) -> float:
            per = float((o.ray_actor_options or {}).get("num_cpus", 1))
            if o.autoscaling_config:
                n = int(o.autoscaling_config.get("min_replicas", 1) or 0)
            else:
                n = o.num_replicas if isinstance(o.num_replicas, int) else 1
            return per * n

        return cpus(self.ingress_options()) + cpus(self.encoder_options()) + (
            cpus(self.shard_options("*")) if packed and shard_names
            else sum(cpus(self.shard_options(s)) for s in shard_names))


def shard_deployment_names(shard_names: list[str]) -> dict[str, str]:
    """Serve deployment name of every shard (``fine/B_cell`` → ``shard-fine.B_cell``; unique)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in shard_names:
        base = "shard-" + name.replace("/", ".").replace("#", "_")
        candidate, i = base, 1
        while candidate in used:
            i += 1
            candidate = f"{base}~{i}"
        used.add(candidate)
        out[name] = candidate
    return out


def local_num_cpus(args: ServiceArgs, shard_names: list[str], cores: int, packed: bool = False) -> int:
    """Logical CPUs for a local Ray running the whole service (at least the machine's cores)."""
    return max(cores, math.ceil(args.required_cpus(shard_names, packed)))
