"""The Ray Train loop: every worker streams its shard of the store and calls ``train_step``.

Per worker: build the model from the config, wrap it in DDP (``prepare_model``), resume from the
last checkpoint if there is one, then for every epoch iterate ``get_dataset_shard("train")``.

Shards are uneven on purpose (every cell is seen exactly once per epoch; see
``ExactlyOnceDataConfig``), so workers step in lockstep while all of them have data — a
one-integer all-reduce per step tells — and finish the uneven tail inside DDP's ``join()``,
which shadows the collectives of workers that ran out. Mid-epoch checkpoints are reported only
in the lockstep phase, because ``ray.train.report`` is a barrier every worker must reach.

A resumed run restarts the interrupted epoch's stream (cells seen before the failure in that
epoch are seen again) and continues the step count and learning-rate schedule where the
checkpoint left them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from atlas.data.dataset import iter_batches
from atlas.data.plan import ReadPlan
from atlas.models.config import build_model
from atlas.models.layers import DomainBatchNorm1d, broadcast_codebooks, worker_local_codebooks
from atlas.train.config import BuildConfig, build_config_from_dict
from atlas.train.step import make_scheduler, train_step

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


def worker_config(
    build: BuildConfig,
    plan: ReadPlan,
    vocab_sizes: dict[str, int],
    initial_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The ``train_loop_config`` of a build: small, picklable, without the plan's cell lists."""
    return {
        "build": build.to_dict(),
        "plan": replace(plan, blocks=()),
        "n_cells": plan.n_cells,
        "vocab_sizes": vocab_sizes,
        "n_domains": len(plan.domain_names),
        "initial_state": initial_state,
    }


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _all_have_batch(has_batch: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has_batch
    flag = torch.tensor([int(has_batch)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sync_normalisation_statistics(model: torch.nn.Module) -> None:
    """Merge the BatchNorm running statistics of all workers (every worker must call this).

    Domain-specific BatchNorm: per domain, the average of the workers' statistics weighted by
    how many minibatches of that domain each worker saw. Plain BatchNorm: the plain average.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DomainBatchNorm1d):
                seen = module.domain_batches.to(torch.float64)
                weights = seen[:, None]
                stats = torch.cat([module.running_mean.double() * weights, module.running_var.double() * weights,
                                   seen[:, None]], dim=1)
                dist.all_reduce(stats)
                total = stats[:, -1:]
                have = total[:, 0] > 0
                c = module.num_features
                module.running_mean[have] = (stats[have, :c] / total[have]).to(module.running_mean.dtype)
                module.running_var[have] = (stats[have, c : 2 * c] / total[have]).to(module.running_var.dtype)
                # The mean count keeps weights on the same scale at every later merge.
                module.domain_batches.copy_(torch.ceil(total[:, 0] / world).to(module.domain_batches.dtype))
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                for buffer in (module.running_mean, module.running_var):
                    dist.all_reduce(buffer)
                    buffer.div_(world)


def _align_steps(global_step: int, scheduler, device: torch.device) -> int:
    """After an uneven tail, bring every worker to the largest step count (and its learning
    rate), so that lockstep checkpoints and the schedule agree across workers."""
    t = torch.tensor([global_step], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    target = int(t.item())
    for _ in range(target - global_step):
        scheduler.step()
    return target


def _sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather_node_ids(world: int) -> list[str]:
    """The Ray node of every worker, by rank (recorded in the history: where did training run?)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return nodes


class _Progress:
    """Step metrics of one worker, a progress line on rank 0, and epoch summaries."""

    def __init__(self, rank: int, epochs: int, steps_per_epoch: int, print_every: int = 25):
        self.rank, self.epochs, self.steps_per_epoch, self.print_every = rank, epochs, steps_per_epoch, print_every
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.cells = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, float], cells: int, epoch: int, global_step: int) -> None:
        self.steps += 1
        self.cells += cells
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.rank == 0 and self.steps % self.print_every == 0:
            rate = self.cells / max(time.perf_counter() - self.start, 1e-9)
            extra = "".join(f" {k} {v:.1f}" for k, v in metrics.items() if k.startswith("perplexity"))
            print(
                f"[train] epoch {epoch + 1}/{self.epochs} step {self.steps}/~{self.steps_per_epoch} "
                f"loss {metrics['loss']:.4f}{extra} lr {metrics['lr']:.2e} {rate:,.0f} cells/s (worker 0)",
                flush=True,
            )

    def means(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    import ray.train
    import ray.train.torch

    build = build_config_from_dict(cfg["build"])
    plan: ReadPlan = cfg["plan"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(build.train.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("ATLAS_TORCH_THREADS", "1"))))

    model = build_model(build.model, cfg["vocab_sizes"], cfg["n_domains"],
                        tuple(len(c) for c in plan.label_classes))
    if cfg.get("initial_state"):  # fitted on the driver: CVQVAE's input views, the heads' class weights
        model.load_state_dict(cfg["initial_state"], strict=False)
    multimodal = len(build.model.modalities) > 1
    # broadcast_buffers=False: DDP would otherwise copy rank 0's normalisation statistics over
    # every worker's at each step, erasing the statistics of domains only other workers saw.
    # Workers' statistics are merged instead at every checkpoint (sync_normalisation_statistics).
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": multimodal, "broadcast_buffers": False}
    )
    device = ray.train.torch.get_device()
    optimizer = torch.optim.Adam(model.parameters(), lr=build.train.lr, weight_decay=build.train.weight_decay)
    steps_per_epoch = max(1, math.ceil(cfg["n_cells"] / world / plan.batch_size))
    epochs = build.train.epochs
    assert epochs is not None  # BuildConfig resolves the model's default
    scheduler = make_scheduler(model, optimizer, epochs * steps_per_epoch)

    history: dict[str, Any] = {"epochs": [], "steps": []}
    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
            history = json.loads((Path(folder) / HISTORY_FILE).read_text())
        _inner(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        global_step = state["global_step"]
        start_epoch = state["epoch"] + (1 if state["epoch_complete"] else 0)
        history.setdefault("resumes", []).append({"epoch": state["epoch"], "global_step": global_step})
        if rank == 0:
            print(f"[train] resumed from checkpoint at epoch {state['epoch'] + 1}, step {global_step}", flush=True)

    history["worker_nodes"] = _gather_node_ids(world)
    shard = ray.train.get_dataset_shard("train")
    progress = _Progress(rank, epochs, steps_per_epoch)

    def report(epoch: int, epoch_complete: bool, metrics: dict[str, float]) -> None:
        sync_normalisation_statistics(_inner(model))
        metrics = {**metrics, "epoch": epoch, "global_step": global_step, "epoch_complete": epoch_complete}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(
                {
                    "model": _inner(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "epoch_complete": epoch_complete,
                    "global_step": global_step,
                    "plan_seed": plan.seed,
                },
                Path(folder) / STATE_FILE,
            )
            (Path(folder) / HISTORY_FILE).write_text(json.dumps(history))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def step(batch: dict[str, torch.Tensor], epoch: int) -> None:
        nonlocal global_step
        metrics = train_step(model, batch, optimizer, grad_clip=build.train.grad_clip, scheduler=scheduler)
        global_step += 1
        progress.add(metrics, int(batch["soma_joinid"].numel()), epoch, global_step)
        if rank == 0 and global_step % 10 == 0:
            history["steps"].append({"step": global_step, "epoch": epoch, **metrics})

    for epoch in range(start_epoch, epochs):
        progress.reset()
        batches = iter(
            iter_batches(shard, plan, epoch=epoch, shuffle_buffer=build.train.shuffle_buffer, seed=build.train.seed)
        )
        pending = None
        while True:
            batch = next(batches, None)
            if not _all_have_batch(batch is not None, device):
                pending = batch
                break
            if batch is None:  # impossible: _all_have_batch is False when this worker has none
                raise RuntimeError("every worker reported a batch but this one has none")
            step(batch, epoch)
            # global_step is equal on every worker here (lockstep), so all of them reach report().
            if global_step % build.train.checkpoint_every == 0:
                report(epoch, False, {"loss": progress.means().get("loss", float("nan"))})
        if world > 1:  # the uneven tail: workers that ran out shadow the others' all-reduces
            # and DDP re-synchronises the parameters when all have joined. Join does not shadow
            # the codebook's own collectives: those stay local here and rank 0's are broadcast.
            with model.join(), worker_local_codebooks():
                if pending is not None:
                    step(pending, epoch)
                for batch in batches:
                    step(batch, epoch)
            broadcast_codebooks(_inner(model))
            global_step = _align_steps(global_step, scheduler, device)
        means = progress.means()
        seconds = time.perf_counter() - progress.start
        loss_sum, steps, cells = _sum_across_workers(
            [means.get("loss", 0.0) * progress.steps, progress.steps, progress.cells], device
        )
        summary = {**means, "loss": loss_sum / max(steps, 1), "cells": int(cells), "steps": int(steps),
                   "seconds": seconds, "cells_per_s": cells / max(seconds, 1e-9)}
        history["epochs"].append({"epoch": epoch, **summary})
        if rank == 0:
            print(
                f"[train] epoch {epoch + 1}/{epochs} done: loss {summary['loss']:.4f}, "
                f"{int(cells):,} cells in {seconds:.1f} s ({summary['cells_per_s']:,.0f} cells/s, all workers)",
                flush=True,
            )
        report(epoch, True, summary)
