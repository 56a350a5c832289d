"""The build config: one typed object, loadable from YAML, stored whole in the artifact manifest.

Example ``build.yaml``::

    name: pbmc10k-concerto
    store: stores/pbmc10k            # an atlas store folder (its current version is pinned)
    output: artifacts/pbmc10k        # the atlas artifact folder
    model: {model: concerto, modalities: [RNA], embed_dim: 128}
    data: {batch_size: 64, single_domain: true, domain_key: batch}
    train: {epochs: 3, lr: 1.0e-3, checkpoint_every: 200}
    scaling: {num_workers: 2, use_gpu: false}
    index: {levels: [cell_type_l1, cell_type_l2], profiles: [protein]}

Every section has defaults; unknown keys are errors (a typo must not be silently ignored). The
sections are frozen dataclasses validated by pydantic, as the service's arguments are
(:class:`atlas.service.config.ServiceArgs`): one configuration mechanism for the project.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter, ValidationError, with_config

from atlas.data.dataset import StreamConfig
from atlas.errors import AtlasError
from atlas.models.config import CLOSED, ModelConfig, validation_message


class ConfigError(AtlasError, ValueError):
    """A build config that cannot be used, with the key at fault."""


@with_config(CLOSED)
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the schedule itself is the method's: see atlas.train.step)."""

    epochs: int | None = None
    """Passes over the reference. None: :func:`default_epochs` of the model (stored resolved)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    """Steps between checkpoints (a checkpoint is also written at the end of every epoch)."""
    keep_checkpoints: int = 2
    shuffle_buffer: int = 4096
    """Cells in each worker's local shuffle buffer (mixed minibatches only)."""
    view_fit_cells: int = 50_000
    """CVQVAE PCA/LSI views are fitted on at most this many reference cells."""


@with_config(CLOSED)
@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers (``ray.train.ScalingConfig``)."""

    num_workers: int = 1
    use_gpu: bool | None = None
    """None: use GPUs when the cluster has them."""
    resources_per_worker: dict = field(default_factory=dict)


@with_config(CLOSED)
@dataclass(frozen=True)
class RunSection:
    """Where checkpoints go and how failures are handled (``RunConfig``, ``FailureConfig``)."""

    storage_path: str | None = None
    """Local folder or object-storage URI for checkpoints; default: ``<output>/../runs``."""
    max_failures: int = 2


@with_config(CLOSED)
@dataclass(frozen=True)
class IndexSection:
    """Reference embedding, faiss index layout and modality profiles."""

    levels: tuple[str, ...] = ()
    """Label levels, coarse to fine (obs columns of the store); empty: hash shards, flat mapping."""
    profiles: tuple[str, ...] = ()
    """Modalities whose normalised values are stored per reference cell (missing-modality prediction)."""
    kind: str = "auto"
    exact_below: int = 200_000
    hash_shards: int = 4
    embed_batch_size: int = 2048
    embed_actors: int = 1
    profile_space: int | None = None
    """Components of the PCA of RNA that ``profiles`` are predicted in, beside the embedding
    (:mod:`atlas.index.profile_space`; chosen on the reference, mean r over 14 proteins 0.839 →
    0.859). 0: the embedding's neighbours alone, equal weights. None: 50 for a Concerto model that
    reads RNA (where it was validated), else 0."""
    label_space: Literal["auto", "embedding", "profiles"] = "auto"
    """Where labels are voted: ``"embedding"`` (the atlas embedding) or ``"profiles"`` (the profile
    space, the embedding beside the PCA of RNA: every shard's index holds those vectors; needs
    ``profile_space`` > 0 and RNA). ``"auto"``: ``"profiles"`` when the model reads RNA and
    ``profile_space`` > 0, else ``"embedding"``. Chosen on held-out reference cells
    (``benchmarks/validate_label_space.py``): a held-out patient of liao2020 level 1 0.736 → 0.770
    accuracy, level 2 0.431 → 0.478; pbmc10k's held-out reference cells unchanged (±0.002)."""
    rejection_rate: float = 0.05
    """Fraction of held-out reference cells the calibrated unknown thresholds may reject."""
    calibration_cells: int = 5000
    """Reference cells mapped leave-one-out to calibrate the thresholds (0: no calibration, and
    a plain vote)."""
    vote_balance: float | None = None
    """Each neighbour's vote is weighted by ``(n_c / n_max) ** -vote_balance`` of its label's
    reference cells (0: a plain similarity-weighted vote). None: :func:`default_vote_balance` of
    the model's modalities (0.5 with RNA or ATAC, 0 for a protein panel), chosen of 0 / 0.5 / 1 on
    held-out reference cells, patients, studies and batches (``benchmarks/validate_embedding.py``)."""


#: Epochs of a build that does not say (``train.epochs``), per model. Concerto: 3, the bottom of
#: the paper's 3–5 (what builds used before this table existed). CVQVAE: 50, the budget its
#: options were validated at on held-out libraries of MOp's reference
#: (``benchmarks/validate_cvqvae.py``; the paper trains 200).
DEFAULT_EPOCHS = {"concerto": 3, "cvqvae": 50}


def default_epochs(model: str) -> int:
    """``train.epochs`` when a build config leaves it out (see :data:`DEFAULT_EPOCHS`)."""
    return DEFAULT_EPOCHS[model]


def default_single_domain(model: Any) -> bool:
    """``data.single_domain`` when a build config leaves it out: single-domain minibatches for a
    CVQVAE with per-domain normalisation (each domain's statistics from whole minibatches, as it
    was validated); Concerto keeps mixed minibatches (its layers group rows by domain)."""
    return bool(getattr(model, "model", None) == "cvqvae" and getattr(model, "domain_norm", "none") != "none")


def default_vote_balance(modalities: tuple[str, ...] | list[str]) -> float:
    """The vote balance of :attr:`IndexSection.vote_balance` None. Balancing lifted rare types
    on RNA (a held-out patient: level-1 macro-F1 +0.1) and cost accuracy on antibody panels
    mapped to unseen batches and studies (level 1 −5.7 points on a held-out CITE-seq batch, level-2
    macro-F1 −8 points on held-out studies), where a few rare-type neighbours of a shifted cell
    outvote many of its own type."""
    return 0.0 if modalities and set(modalities) == {"protein"} else 0.5


@with_config(CLOSED)
@dataclass(frozen=True)
class BuildConfig:
    """Everything needed to rebuild an atlas."""

    store: str
    output: str
    model: ModelConfig
    name: str = "atlas"
    data: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    index: IndexSection = field(default_factory=IndexSection)

    def __post_init__(self) -> None:
        if self.train.epochs is None:  # resolved, like the index defaults: the manifest says what ran
            object.__setattr__(self, "train", dataclasses.replace(self.train, epochs=default_epochs(self.model.model)))
        if self.data.single_domain is None:
            object.__setattr__(self, "data", dataclasses.replace(self.data, single_domain=default_single_domain(self.model)))
        if self.index.vote_balance is None:  # stored resolved: the manifest says what was used
            resolved = dataclasses.replace(self.index, vote_balance=default_vote_balance(self.model.modalities))
            object.__setattr__(self, "index", resolved)
        if self.index.profile_space is None:
            components = 50 if self.model.model == "concerto" and "RNA" in self.model.modalities else 0
            object.__setattr__(self, "index", dataclasses.replace(self.index, profile_space=components))
        if self.index.label_space == "auto":
            space: Literal["embedding", "profiles"] = (
                "profiles" if self.index.profile_space and "RNA" in self.model.modalities else "embedding")
            object.__setattr__(self, "index", dataclasses.replace(self.index, label_space=space))

    @property
    def storage_path(self) -> str:
        return self.run.storage_path or str(Path(self.output).resolve().parent / "runs")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what the manifest stores; :func:`build_config_from_dict` reads it back)."""
        return _BUILD_CONFIG.dump_python(self, mode="json")


_BUILD_CONFIG: TypeAdapter[BuildConfig] = TypeAdapter(BuildConfig)
_SECTION_KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in (
    ("", BuildConfig), ("data", StreamConfig), ("train", TrainConfig), ("scaling", ScalingSection),
    ("run", RunSection), ("index", IndexSection))}


def build_config_from_dict(data: dict[str, Any], base_dir: Path | None = None) -> BuildConfig:
    """Validate a parsed YAML/JSON build config; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("a build config is a mapping with at least 'store', 'output' and 'model'")
    try:
        build = _BUILD_CONFIG.validate_python(data)
    except ValidationError as err:
        raise ConfigError(f"the build config: {validation_message(err, _SECTION_KEYS)}") from None
    if "modalities" not in (data.get("data") or {}):
        build = dataclasses.replace(build, data=dataclasses.replace(build.data, modalities=tuple(build.model.modalities)))
    missing = [m for m in build.model.modalities if m not in build.data.modalities]
    if missing:
        raise ConfigError(f"the model uses {missing} but data.modalities streams only {list(build.data.modalities)}")

    def resolve(path: str) -> str:
        if base_dir is None or "://" in path or Path(path).is_absolute():
            return path
        return str((base_dir / path).resolve())

    return dataclasses.replace(build, store=resolve(build.store), output=resolve(build.output))


def load_build_config(path: str | Path) -> BuildConfig:
    """Read a build config YAML; paths inside it are relative to the file's folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"build config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return build_config_from_dict(data, base_dir=path.resolve().parent)
