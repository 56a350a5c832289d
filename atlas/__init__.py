"""Single-cell reference atlases on Ray.

The store (``atlas.store``), streaming (``atlas.data``), models (``atlas.models``), training
(``atlas.train``), index and mapping live in subpackages; this module stays import-light so the
command line starts fast.
"""

import os

__version__ = "0.1.0"

# Ray Data's progress bars (ray.experimental.tqdm_ray) otherwise replace builtins.print with a
# Python function in this process, and numba (pynndescent in the scIB scores and UMAPs) can then
# no longer compile code that calls print. A user's own setting wins.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
# A Ray this process starts (the local cluster of `atlas build`, `atlas serve`, the demo, the tests)
# inherits this: Ray Train's controller polls its workers every 2 s by default and every step of a
# run (workers up, reports, finish) waits for a poll; at 0.25 s a 2-worker fit starts and ends
# ~3-4 s sooner here (a no-op TorchTrainer: 11-14.5 s -> 9-10 s). Clusters started elsewhere
# keep their own setting.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def __getattr__(name: str):
    """Lazy public API: ``atlas.load_atlas``, ``atlas.map_query`` etc. without importing faiss/torch at ``import atlas``."""
    if name in ("load_atlas", "ArtifactError", "Atlas"):
        from atlas import artifact

        return getattr(artifact, name)
    if name == "map_query":
        from atlas.mapping.query import map_query

        return map_query
    if name == "build_atlas":
        from atlas.build import build_atlas

        return build_atlas
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")
