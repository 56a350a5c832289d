"""Which library versions built an artifact (recorded in its manifest)."""

from __future__ import annotations

import platform
from importlib import metadata


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries an atlas depends on (None: not installed).

    Read from package metadata, so recording ray's version does not import ray.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in {
        "torch": ["torch"],
        "faiss": ["faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss"],
        "numpy": ["numpy"],
        "ray": ["ray"],
        "tiledbsoma": ["tiledbsoma"],
        "anndata": ["anndata"],
        "atlas": ["ray-cell-atlas"],  # the distribution name; "atlas" on PyPI is another project
    }.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = f"{metadata.version(dist)}" + ("" if name != "faiss" else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                continue
    return out
