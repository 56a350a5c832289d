"""The neighbour space missing modalities are predicted in: the atlas embedding beside a PCA of RNA.

The atlas embedding is trained to separate cell types (contrastive objective plus label heads),
which is what labels need; a protein's level varies *within* a type, and the embedding keeps less
of that variation than a linear view of the RNA does. Chosen on the reference alone
(``benchmarks/validate_profiles.py``: each reference cell predicted from the other reference cells
of the pbmc10k demo atlas, mean r over 14 proteins): the embedding 0.839, a 50-component PCA of the
log-normalised RNA 0.851, **both side by side, equal weight, the 25 nearest cells weighted by a
softmax of their similarity at temperature 0.05: 0.859**.

A :class:`ProfileSpace` holds that PCA (fitted at build time on the reference, stored in the
artifact as ``profile_space.npz``); :meth:`ProfileSpace.vectors` makes the unit vectors
``[unit(embedding), weight × unit(PCA coordinates)] / norm`` that the root shards' second index
(``profile_index.faiss``) holds for the reference and that queries are searched with, so the
cosine similarity of two cells is ``(cos_embedding + weight² cos_PCA) / (1 + weight²)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

PROFILE_SPACE_FILE = "profile_space.npz"
#: What the build fits unless told otherwise (chosen on the reference; see the module docstring).
DEFAULT_COMPONENTS = 50
DEFAULT_TEMPERATURE = 0.05
#: Cells the PCA is fitted on (a random subset of a larger reference): enough for 50 components.
FIT_CELLS = 20_000
#: A query with fewer of the PCA's genes than this (a panel, another platform) would land in the
#: PCA shifted by the genes it lacks: its profiles come from the embedding's neighbours instead.
MIN_GENE_FRACTION = 0.9


@dataclass(frozen=True)
class ProfileSpace:
    """A PCA of one modality's normalised values, and how it is weighed against the embedding."""

    modality: str
    """The modality the PCA is of (its features: the atlas vocabulary of it, in order)."""
    mean: np.ndarray
    """float32 [G]: the reference's mean normalised value of each feature."""
    components: np.ndarray
    """float32 [c, G]: the principal axes."""
    weight: float = 1.0
    """The PCA block's weight beside the embedding's (both unit length first)."""
    temperature: float = DEFAULT_TEMPERATURE
    """Neighbour weights are ``exp((similarity - best) / temperature)``."""

    def __post_init__(self) -> None:
        if self.components.ndim != 2 or self.mean.shape != (self.components.shape[1],):
            raise ValueError(f"profile space: components {self.components.shape} and mean {self.mean.shape} "
                             "do not match")
        if not self.weight > 0 or not self.temperature > 0:
            raise ValueError("profile space: weight and temperature must be > 0")

    @property
    def n_features(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, normalised: sp.spmatrix | np.ndarray, modality: str = "RNA", *,
            n_components: int = DEFAULT_COMPONENTS, seed: int = 0, **options: Any) -> ProfileSpace:
        """PCA of ``normalised`` (cells × features, already normalised as the model's input is)."""
        from sklearn.decomposition import PCA

        x = sp.csr_matrix(normalised, dtype=np.float32)
        n, g = x.shape
        c = min(n_components, n - 1, g - 1)
        if c < 1:
            raise ValueError(f"profile space: a PCA needs at least 2 cells and 2 features; got {n} × {g}")
        # ARPACK takes the sparse matrix as it is (centred implicitly): no dense cells × genes copy.
        pca = PCA(n_components=c, svd_solver="arpack", random_state=seed).fit(x)
        return cls(modality, pca.mean_.astype(np.float32), pca.components_.astype(np.float32), **options)

    def project(self, normalised: sp.spmatrix | np.ndarray) -> np.ndarray:
        """PCA coordinates (float32 [n, c]) of cells × :attr:`n_features` normalised values."""
        x = sp.csr_matrix(normalised, dtype=np.float32)
        if x.shape[1] != self.n_features:
            raise ValueError(f"profile space: cells have {x.shape[1]} {self.modality} features, "
                             f"the PCA {self.n_features}")
        shift = self.components @ self.mean
        return (np.asarray(x @ self.components.T, dtype=np.float32) - shift[None, :]).astype(np.float32)

    def vectors(self, embedding: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """Unit vectors of the embedding and the PCA coordinates side by side (float32 [n, D + c])."""
        from atlas.index.faiss_index import normalize

        return normalize(np.hstack([normalize(embedding), np.float32(self.weight) * normalize(coords)]))

    def neighbour_weights(self, similarity: np.ndarray) -> np.ndarray:
        """Softmax weights of each query's hits (best first; a missing hit, -inf, weighs 0)."""
        sims = np.asarray(similarity, dtype=np.float64)
        best = np.where(np.isfinite(sims[:, :1]), sims[:, :1], 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            w = np.exp((sims - best) / self.temperature)
        return np.where(np.isfinite(sims), w, 0.0)

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write ``profile_space.npz`` into ``folder``; returns the manifest entry."""
        np.savez(Path(folder) / PROFILE_SPACE_FILE, mean=self.mean, components=self.components)
        return {"file": PROFILE_SPACE_FILE, "modality": self.modality, "components": int(self.components.shape[0]),
                "weight": self.weight, "temperature": self.temperature}


def read_profile_space(root: str | Path, entry: Mapping[str, Any] | None) -> ProfileSpace | None:
    """The profile space a manifest entry (``mapping.profile_space``) names, or None."""
    if not entry or "file" not in entry:
        return None
    with np.load(Path(root) / entry["file"], allow_pickle=False) as data:
        return ProfileSpace(str(entry["modality"]), data["mean"], data["components"],
                            float(entry.get("weight", 1.0)), float(entry.get("temperature", DEFAULT_TEMPERATURE)))
