"""The one training step, learning-rate schedules, and a single-process training helper.

``train_step`` is the only implementation of an optimisation step in the project: ``fit_local``
(tests, small demos) calls it, and so does the distributed Ray Train loop, which wraps the model
in DDP first. The model's ``forward(batch)`` returns the loss, so DDP synchronises gradients.

No Ray here, and no device-specific branches beyond one: bf16 autocast when the batch lives on
CUDA, full fp32 elsewhere.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atlas.data.batches import modality_keys

Batch = Mapping[str, torch.Tensor]


def move_batch(batch: Batch, device: torch.device | str, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """Copy every tensor of a batch dict to ``device`` (no-op for tensors already there)."""
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's parameters (works through DDP wrappers)."""
    return next(model.parameters()).device


def autocast_context(device: torch.device | str, enabled: bool | None = None) -> AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) elsewhere; ``enabled=False`` forces fp32."""
    device = torch.device(device)
    if device.type == "cuda" and enabled is not False:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    autocast: bool | None = None,
) -> dict[str, float]:
    """One optimisation step on one minibatch; returns the model's metrics as floats.

    The batch is moved to the model's device; the forward pass runs under bf16 autocast on CUDA
    (``autocast=None``: automatic; False: always fp32); gradients are clipped to ``grad_clip``
    (global norm; None disables); the scheduler, if any, steps once per call. Returned keys:
    everything scalar the model's ``forward`` returned, plus ``lr`` and ``grad_norm``.
    """
    model.train()
    device = model_device(model)
    batch = move_batch(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, autocast):
        out = model(batch)
    loss = out["loss"]
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip is not None and params:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    elif params:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    else:
        grad_norm = torch.zeros(())
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    if scheduler is not None:
        scheduler.step()
    metrics = {k: float(v.detach().float()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    metrics["lr"] = float(lr)
    metrics["grad_norm"] = float(grad_norm)
    return metrics


# -- learning-rate schedules ---------------------------------------------------------------------
def polynomial_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, end_fraction: float = 0.01, power: float = 1.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Concerto's schedule: decay from the initial rate to ``end_fraction`` of it over
    ``total_steps`` (the real number of optimisation steps), then stay there."""
    total_steps = max(int(total_steps), 1)

    def factor(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return (1 - end_fraction) * (1 - progress) ** power + end_fraction

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_annealing(
    optimizer: torch.optim.Optimizer, total_steps: int, min_fraction: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """CVQVAE's schedule: cosine from the initial rate to ``min_fraction`` of it over ``total_steps``."""
    total_steps = max(int(total_steps), 1)

    def factor(step: int) -> float:
        progress = min(step, total_steps) / total_steps
        return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_scheduler(
    model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule each method's paper uses: polynomial decay to 1% (Concerto), cosine (CVQVAE)."""
    inner = getattr(model, "module", model)  # DDP wrapper
    kind = getattr(getattr(inner, "config", None), "model", None)
    if kind == "concerto":
        return polynomial_decay(optimizer, total_steps, end_fraction=0.01)
    if kind == "cvqvae":
        return cosine_annealing(optimizer, total_steps)
    raise ValueError(f"no default schedule for model {type(inner).__name__}")


# -- single-process training ---------------------------------------------------------------------
def minibatches(
    batch: Batch,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    by_domain: bool = False,
    drop_last: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Cut one big in-memory batch dict into minibatches (tests and demos; the streaming
    pipeline forms minibatches itself). ``by_domain`` makes every minibatch single-domain, as
    Concerto's original training did. Padding columns beyond a minibatch's longest cell are
    trimmed. ``drop_last`` drops the incomplete tail of each group (BatchNorm needs > 1 cell)."""
    rng = np.random.default_rng(seed)
    domain = batch["domain"].cpu().numpy()
    groups = [np.flatnonzero(domain == d) for d in np.unique(domain)] if by_domain else [np.arange(len(domain))]
    chunks = []
    for idx in groups:
        if shuffle:
            idx = rng.permutation(idx)
        stop = len(idx) - (len(idx) % batch_size if drop_last and len(idx) >= batch_size else 0)
        chunks += [idx[i : i + batch_size] for i in range(0, stop, batch_size)]
    if shuffle:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return [take_rows(batch, torch.as_tensor(c)) for c in chunks if len(c) > 1 or not drop_last]


def take_rows(batch: Batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Select cells of a batch dict, trimming padding to the longest selected cell."""
    out = {k: v[rows] for k, v in batch.items()}
    for key in [k for k in out if k.endswith("_mask")]:
        m = key[: -len("_mask")]
        width = int(out[key].sum(1).max()) if out[key].numel() else 0
        width = max(width, 1)
        # Features of a cell are left-aligned (csr_to_batch), so trimming keeps all of them.
        if bool(out[key][:, width:].any()):
            continue  # not left-aligned: keep the full width
        for name in modality_keys(m):
            out[name] = out[name][:, :width]
    return out


@dataclass
class FitHistory:
    """Metrics of a ``fit_local`` run: one dict per step and the per-epoch means."""

    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fit_local(
    model: nn.Module,
    batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    epochs: int,
    lr: float,
    *,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    schedule: bool = True,
    steps_per_epoch: int | None = None,
    device: torch.device | str | None = None,
    autocast: bool | None = None,
    log: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: str | Path | None = None,
) -> FitHistory:
    """Train a model in this process with Adam and the method's schedule; returns its history.

    ``batches`` is a re-iterable collection of batch dicts (e.g. a list from
    :func:`minibatches`) or a function ``epoch -> iterable`` (new shuffling each epoch). The
    schedule spans the real number of steps (``epochs × steps_per_epoch``; taken from
    ``len(batches)`` when it has one). ``log(epoch, epoch_means)`` is called after each epoch.

    ``checkpoint`` names a file that receives the whole training state after every epoch
    (model, optimiser, schedule, history, torch RNG). When it exists at the start, training
    continues after its last epoch, so a run that was stopped resumes where it left off; with
    ``batches`` a function of the epoch, the resumed run equals an uninterrupted one.
    """
    if device is not None:
        model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = steps_per_epoch
    if per_epoch is None and not callable(batches):
        per_epoch = len(batches)  # type: ignore[arg-type]
    scheduler = None
    if schedule:
        if per_epoch is None:
            raise ValueError("steps_per_epoch is needed for the schedule when batches is a function")
        scheduler = make_scheduler(model, optimizer, epochs * per_epoch)
    history = FitHistory()
    first_epoch, seconds_before = 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        first_epoch, seconds_before = _restore(Path(checkpoint), model, optimizer, scheduler, history,
                                               epochs=epochs, lr=lr, steps_per_epoch=per_epoch)
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        source: Iterator[Batch] = iter(batches(epoch) if callable(batches) else batches)
        epoch_metrics = []
        for batch in source:
            m = train_step(model, batch, optimizer, grad_clip=grad_clip, scheduler=scheduler, autocast=autocast)
            m["epoch"] = float(epoch)
            history.steps.append(m)
            epoch_metrics.append(m)
        if epoch_metrics:
            means = {k: float(np.mean([m[k] for m in epoch_metrics])) for k in epoch_metrics[0]}
            history.epochs.append(means)
            if log is not None:
                log(epoch, means)
        if checkpoint is not None:
            _save(Path(checkpoint), epoch + 1, model, optimizer, scheduler, history, epochs=epochs, lr=lr,
                  steps_per_epoch=per_epoch, seconds=seconds_before + time.perf_counter() - start)
    history.seconds = seconds_before + time.perf_counter() - start
    return history


def _save(path: Path, done: int, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None, history: FitHistory,
          *, epochs: int, lr: float, steps_per_epoch: int | None, seconds: float) -> None:
    state = {"epochs_done": done, "epochs": epochs, "lr": lr, "steps_per_epoch": steps_per_epoch, "seconds": seconds,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "steps": history.steps, "epoch_means": history.epochs,
             "torch_rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a run killed while saving leaves the previous epoch's file intact


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, history: FitHistory,
             *, epochs: int, lr: float, steps_per_epoch: int | None) -> tuple[int, float]:
    state = torch.load(path, map_location=model_device(model), weights_only=False)
    saved = (state["epochs"], state["lr"], state.get("steps_per_epoch", steps_per_epoch))
    if saved != (epochs, lr, steps_per_epoch):
        raise ValueError(f"{path} holds a run of {saved[0]} epochs of {saved[2]} steps at lr {saved[1]}, not "
                         f"{epochs} of {steps_per_epoch} at {lr}: its schedule cannot be continued. Delete the "
                         "file to start afresh, or pass the settings it was started with.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    history.steps.extend(state["steps"])
    history.epochs.extend(state["epoch_means"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epochs_done"]), float(state["seconds"])
