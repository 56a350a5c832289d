"""Build a Ray Train ``TorchTrainer`` from a build config, run it, and read back the result."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from atlas.data.dataset import ExactlyOnceDataConfig, make_dataset
from atlas.data.plan import ReadPlan
from atlas.data.reader import read_csr
from atlas.models.config import ConcertoConfig, build_model
from atlas.train.config import BuildConfig
from atlas.train.loop import HISTORY_FILE, STATE_FILE, train_loop_per_worker, worker_config


@dataclass
class TrainResult:
    """What a finished training run leaves: the weights, the history and where checkpoints are."""

    model_state: dict[str, torch.Tensor]
    history: dict[str, Any]
    run_path: str
    metrics: dict[str, Any]
    seconds: float


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _run_folders(storage_path: str, prefix: str) -> list[str]:
    """Names of the run folders under a local path or an object-storage URI."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage_path if "://" in storage_path else str(Path(storage_path).resolve()))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(prefix))


def run_name_for(build: BuildConfig, resume: bool) -> str:
    """A fresh name per build (Ray Train resumes silently from a reused name), or, with
    ``resume``, the newest earlier run of this build so it continues from its checkpoint."""
    if resume:
        earlier = _run_folders(build.storage_path, f"{build.name}-")
        if not earlier:
            raise FileNotFoundError(f"--resume: no earlier run of '{build.name}' under {build.storage_path}")
        return earlier[-1]
    return f"{build.name}-{time.strftime('%Y%m%d-%H%M%S')}-{np.random.default_rng().integers(1 << 16):04x}"


def uses_labels(build: BuildConfig) -> bool:
    """Whether the build trains label heads: a Concerto model with a head weight and label levels."""
    return bool(build.index.levels) and float(getattr(build.model, "head_weight", 0.0)) > 0


def initial_state(build: BuildConfig, plan: ReadPlan, vocab_sizes: dict[str, int], n_domains: int) -> dict | None:
    """Weights fitted on the driver before training: CVQVAE's input views, the heads' class weights."""
    state = fit_views_state(build, plan, vocab_sizes, n_domains) or {}
    if plan.label_levels:
        from atlas.models.heads import class_weights

        if not isinstance(build.model, ConcertoConfig):  # uses_labels: only Concerto has label heads
            raise TypeError(f"label levels need a Concerto model, not {type(build.model).__name__}")

        codes = np.concatenate([b.labels for b in plan.blocks if b.labels is not None])
        for i, classes in enumerate(plan.label_classes):
            counts = np.bincount(codes[:, i][codes[:, i] >= 0], minlength=len(classes))
            weight = torch.from_numpy(class_weights(counts, build.model.class_weight_power))
            for heads in ("heads", "student_heads"):  # loaded with strict=False: a model without one ignores it
                state[f"{heads}.class_weight_{i}"] = weight
    return state or None


def fit_views_state(build: BuildConfig, plan: ReadPlan, vocab_sizes: dict[str, int], n_domains: int) -> dict | None:
    """Fit CVQVAE's PCA/LSI input views on a sample of reference cells (driver, bounded memory)."""
    if getattr(build.model, "input_view", None) != "pca_lsi":
        return None
    model = build_model(build.model, vocab_sizes, n_domains)
    if not hasattr(model, "fit_views"):
        return None
    joinids = np.concatenate([b.joinids for b in plan.blocks])
    rng = np.random.default_rng(build.train.seed)
    sample = np.sort(rng.choice(joinids, min(joinids.size, build.train.view_fit_cells), replace=False))
    counts = {m: read_csr(plan.uri, m, sample) for m in build.model.modalities}
    model.fit_views(counts, max_cells=None, seed=build.train.seed)
    return {k: v for k, v in model.state_dict().items() if k.startswith("views.")}


def make_trainer(
    build: BuildConfig,
    plan: ReadPlan,
    vocab_sizes: dict[str, int],
    initial: dict | None,
    run_name: str,
) -> TorchTrainer:
    """The TorchTrainer of a build: workers, failure handling, checkpoints and the data shard."""
    use_gpu = build.scaling.use_gpu if build.scaling.use_gpu is not None else cluster_has_gpus()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(build, plan, vocab_sizes, initial),
        scaling_config=ScalingConfig(
            num_workers=build.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=dict(build.scaling.resources_per_worker) or None,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=build.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=build.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=build.run.max_failures),
        ),
        datasets={"train": make_dataset(plan)},
        dataset_config=ExactlyOnceDataConfig(),
    )


def train(
    build: BuildConfig,
    plan: ReadPlan,
    vocab_sizes: dict[str, int],
    *,
    initial: dict | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train the build's model on the plan's cells with Ray Train; returns the final weights."""
    run_name = run_name_for(build, resume)
    start = time.perf_counter()
    result = make_trainer(build, plan, vocab_sizes, initial, run_name).fit()
    seconds = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        history = json.loads((Path(folder) / HISTORY_FILE).read_text())
    return TrainResult(
        model_state=state["model"],
        history=history,
        run_path=f"{build.storage_path.rstrip('/')}/{run_name}",
        metrics=dict(result.metrics or {}),
        seconds=seconds,
    )
