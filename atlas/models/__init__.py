"""Torch modules of the two methods (no Ray, no SOMA, no AnnData here).

* :class:`~atlas.models.concerto.Concerto` — contrastive teacher/student embedding (mapping).
* :class:`~atlas.models.cvqvae.CVQVAE` — cross-trained vector-quantised autoencoder (paired
  modalities, missing-modality prediction).

Build either from its typed config with :func:`build_model`; both take the index-value batches
of :mod:`atlas.data.batches` and return the loss from ``forward(batch)``.
"""

from atlas.models.concerto import Concerto, nt_xent
from atlas.models.config import (
    ConcertoConfig,
    CVQVAEConfig,
    ModelConfig,
    build_model,
    config_from_dict,
    config_to_dict,
)
from atlas.models.cvqvae import CVQVAE

__all__ = [
    "CVQVAE",
    "CVQVAEConfig",
    "Concerto",
    "ConcertoConfig",
    "ModelConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "nt_xent",
]
