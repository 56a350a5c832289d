"""Typed model configurations and the one model factory.

Each model has a frozen dataclass config, validated by pydantic (the one configuration
mechanism of the project: build configs and the service's arguments are read the same way).
``config_to_dict`` gives a JSON-able dict (stored in the atlas artifact's manifest),
``config_from_dict`` reads it back (the ``"model"`` key picks the class), and ``build_model``
turns a config plus the store's vocabulary sizes into a module, so any atlas can be rebuilt from
its manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from torch import nn

#: Every configuration section refuses keys it does not know (a typo must not pass silently).
CLOSED = ConfigDict(extra="forbid")

MODALITY_NAMES = ("RNA", "protein", "ATAC")


@with_config(CLOSED)
@dataclass(frozen=True)
class ConcertoConfig:
    """Concerto: contrastive self-distillation between an attention teacher and a dense student."""

    model: Literal["concerto"] = "concerto"
    #: Measurements used, one teacher/student pair each (``RNA``, ``protein``, ``ATAC``).
    modalities: tuple[str, ...] = ("RNA",)
    #: Width of feature embeddings, pooled vector and output embedding.
    embed_dim: int = 128
    #: Dropout in teacher and student; the two independent masks are the only augmentation.
    dropout: float = 0.1
    #: Dense → BN → dropout → ReLU blocks in the student (the original stacks two).
    student_blocks: int = 1
    #: NT-Xent temperature.
    temperature: float = 0.1
    #: Gather negatives from all data-parallel workers (needs torch.distributed initialised).
    gather_negatives: bool = False
    #: Per-domain batch-norm statistics (batch effect removal); False = one set of statistics.
    domain_bn: bool = True
    #: Weight of the label heads' cross-entropy beside the contrastive loss, when the build's
    #: index levels carry labels (0: the reference labels are not used in training). 3 was best
    #: of 0 / 0.3 / 1 / 3 / 10 on held-out reference cells and studies (benchmarks/validate_heads.py).
    head_weight: float = 3.0
    #: Class weights of the heads' cross-entropy: ``(n_c / n_max) ** -power`` (0: none, 1: balanced).
    class_weight_power: float = 0.5
    #: The cell's embedding (what the index holds, the heads read and queries are mapped by):
    #: ``"teacher+student"`` (the two networks' outputs each L2-normalised and concatenated,
    #: 2 × ``embed_dim``, each with heads of its own over it × :data:`~atlas.models.concerto.HEAD_SCALE`),
    #: ``"normalised-teacher"`` (the teacher's output L2-normalised, its heads such a cosine
    #: classifier) or ``"teacher"`` (the original: the teacher's output, heads over it as it is).
    #: Chosen on held-out reference cells, patients, studies and batches
    #: (benchmarks/validate_embedding.py): on RNA teacher+student led; on the two protein panels
    #: teacher+student (mean of level-1/2 accuracy and F1 0.787) edged normalised-teacher (0.775,
    #: ahead on level 1 of the 216-antibody panel, behind on level 2 of the 9-antibody one), both
    #: well ahead of the original (raw teacher heads). Manifests written before this option read as
    #: ``"teacher"`` (see :func:`model_from_spec`).
    embedding: Literal["teacher", "normalised-teacher", "teacher+student"] = "teacher+student"


@with_config(CLOSED)
@dataclass(frozen=True)
class CVQVAEConfig:
    """CVQVAE: two cross-trained encoder/decoder pairs with a vector-quantised latent."""

    model: Literal["cvqvae"] = "cvqvae"
    #: The paired modalities (S1, S2), e.g. ``("RNA", "ATAC")`` or ``("RNA", "protein")``.
    modalities: tuple[str, str] = ("RNA", "ATAC")
    #: ``"pca_lsi"``: fixed views fitted on the reference (PCA of log-normalised RNA/protein,
    #: LSI of ATAC), stored as buffers; ``"learned"``: a sparse learned input layer per modality
    #: and reconstruction of the full feature vector.
    input_view: Literal["pca_lsi", "learned"] = "pca_lsi"
    #: Components of each fixed view (capped at the number of features − 1 when fitting).
    view_components: int = 128
    #: Drop the first LSI component (it tracks sequencing depth, as in Signac/ArchR).
    lsi_drop_first: bool = True
    #: How ATAC values arrive in batches: ``"lognorm"`` (library-size + log1p, converted to
    #: TF-IDF inside the view) or ``"tfidf"`` (already TF-IDF).
    atac_values: Literal["lognorm", "tfidf"] = "lognorm"
    #: Per-domain BatchNorm statistics (the build's ``data.domain_key``), which the published
    #: method lacks: ``"none"`` (one set of statistics, as published), ``"encoders"`` (every
    #: encoder BatchNorm per domain, as Concerto removes batch effects) or ``"all"`` (the decoders'
    #: too, so a decoder can put back what the encoder removed).
    domain_norm: Literal["none", "encoders", "all"] = "encoders"
    #: Hidden widths of encoders (decoders mirror them).
    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 16
    dropout: float = 0.0
    #: False = the "CVAE" ablation: same cross-training, no quantiser.
    quantize: bool = True
    codebook_size: int = 512
    #: One codebook for both modalities instead of K1, K2.
    shared_codebook: bool = False
    decay: float = 0.99
    eps: float = 1e-5
    beta: float = 0.25
    #: Codes whose EMA count is below this fraction of the mean count are re-seeded.
    dead_threshold: float = 0.1
    #: λ1 (E1 → D2 reconstructs S2), λ2 (E2 → D1 reconstructs S1), λ3 (‖z1 − z2‖²).
    lambdas: tuple[float, float, float] = (1.0, 1.0, 10.0)
    #: Weight of each modality's own reconstruction (E1 → D1, E2 → D2) beside the cross terms;
    #: 0 = the published objective (cross reconstruction only), where a latent keeps only what
    #: predicts the *other* modality.
    self_weight: float = 1.0


ModelConfig = Annotated[ConcertoConfig | CVQVAEConfig, Field(discriminator="model")]
"""A model's config: the ``"model"`` key (``concerto`` / ``cvqvae``) picks the class."""
_MODEL_TAGS = ("concerto", "cvqvae")
MODEL_CONFIG: TypeAdapter[ConcertoConfig | CVQVAEConfig] = TypeAdapter(ModelConfig)


def validation_message(error: ValidationError, allowed: Mapping[str, Sequence[str]] | None = None) -> str:
    """One line naming the key at fault for each problem of a pydantic ``error``. ``allowed``
    (section → its keys; ``""`` = top level) adds the keys a section takes to "unknown key"."""
    lines = []
    for e in error.errors():
        path = [str(p) for p in e["loc"] if str(p) not in _MODEL_TAGS]  # the union's member tag is noise
        where, key = ".".join(path[:-1]), (path[-1] if path else "")
        kind, message = e["type"], e["msg"].removeprefix("Value error, ")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            line = f"unknown key '{key}' in section '{where}'" if where else f"unknown top-level key '{key}'"
            if allowed and where in allowed:
                line += f" (allowed: {', '.join(sorted(allowed[where]))})"
        elif kind in ("missing", "missing_argument"):
            line = f"'{where}' needs '{key}'" if where else f"needs '{key}'"
        elif kind == "union_tag_invalid":
            line = f"unknown model {e['ctx']['tag']!r}; expected one of {e['ctx']['expected_tags']}"
        elif kind == "union_tag_not_found":
            line = f"'{'.'.join(path) or 'model'}' needs a 'model' key: concerto or cvqvae"
        else:
            line = f"'{'.'.join(path)}': {message}" if path else message
        lines.append(line)
    return "; ".join(lines)


def config_to_dict(config: ConcertoConfig | CVQVAEConfig) -> dict[str, Any]:
    """JSON-able dict of a config (tuples become lists)."""
    return MODEL_CONFIG.dump_python(config, mode="json")


def config_from_dict(data: dict[str, Any]) -> ConcertoConfig | CVQVAEConfig:
    """Inverse of :func:`config_to_dict`; unknown keys are an error (ValueError naming them)."""
    try:
        return MODEL_CONFIG.validate_python(data)
    except ValidationError as err:
        raise ValueError(validation_message(err)) from None


def _check_modalities(modalities: tuple[str, ...], vocab_sizes: dict[str, int]) -> None:
    for m in modalities:
        if m not in MODALITY_NAMES:
            raise ValueError(f"unknown modality {m!r}; expected one of {MODALITY_NAMES}")
        if m not in vocab_sizes:
            raise ValueError(f"no vocabulary size for modality {m!r} (got {sorted(vocab_sizes)})")


def build_model(config: ConcertoConfig | CVQVAEConfig | dict[str, Any], vocab_sizes: dict[str, int], n_domains: int,
                n_classes: tuple[int, ...] = ()) -> nn.Module:
    """Build the model a config describes.

    ``vocab_sizes`` maps each modality to its vocabulary size (largest feature id + 1);
    ``n_domains`` is the number of domains (batches/donors) in the build's domain list;
    ``n_classes`` the number of classes of each label level (Concerto: one head each).
    A CVQVAE with ``input_view="pca_lsi"`` still needs ``model.fit_views(...)`` before training.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    _check_modalities(tuple(config.modalities), vocab_sizes)
    if isinstance(config, ConcertoConfig):
        from atlas.models.concerto import Concerto

        return Concerto(config, vocab_sizes, n_domains, tuple(n_classes))
    if isinstance(config, CVQVAEConfig):
        if len(config.modalities) != 2:
            raise ValueError(f"CVQVAE needs exactly two modalities, got {config.modalities}")
        from atlas.models.cvqvae import CVQVAE

        return CVQVAE(config, vocab_sizes, n_domains)
    raise TypeError(f"not a model config: {type(config).__name__}")


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The untrained model of an artifact's (or a build's) model section: ``config``,
    ``vocab_sizes``, ``n_domains`` and, for a model with label heads, ``heads.classes``."""
    heads = spec.get("heads") or {}
    config = dict(spec["config"])
    if config.get("model") == "concerto":
        # Atlases written before the option embedded (and trained their heads on) the teacher alone.
        config.setdefault("embedding", "teacher")
    return build_model(config_from_dict(config), {m: int(v) for m, v in spec["vocab_sizes"].items()},
                       int(spec["n_domains"]), tuple(len(c) for c in heads.get("classes", ())))


__all__ = [
    "ConcertoConfig",
    "CVQVAEConfig",
    "ModelConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "model_from_spec",
]
