"""Merging normalisation statistics across data-parallel workers (2 gloo processes)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atlas.models.layers import DomainBatchNorm1d
from atlas.train.loop import sync_normalisation_statistics


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = torch.nn.Sequential()
    model.add_module("dsbn", DomainBatchNorm1d(2, n_domains=3))
    model.add_module("bn", torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        # Worker 0 saw domain 0 three times; worker 1 saw domain 0 once and domain 1 twice.
        counts = [[3, 0, 0], [1, 2, 0]][rank]
        model.dsbn.domain_batches.copy_(torch.tensor(counts))
        model.dsbn.running_mean.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]) if rank == 0
                                      else torch.tensor([[5.0, 5.0], [7.0, 7.0], [0.0, 0.0]]))
        model.bn.running_mean.fill_(float(rank * 2))
    sync_normalisation_statistics(model)
    out[rank] = (model.dsbn.running_mean.clone(), model.dsbn.domain_batches.clone(), model.bn.running_mean.clone())
    dist.destroy_process_group()


def test_domain_statistics_are_merged_weighted_by_what_each_worker_saw():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_port(), out), nprocs=2, join=True)
    for rank in range(2):
        mean, counts, bn = out[rank]
        # Domain 0: (3 × 1 + 1 × 5) / 4 = 2; domain 1 only from worker 1; domain 2 never seen.
        torch.testing.assert_close(mean, torch.tensor([[2.0, 2.0], [7.0, 7.0], [0.0, 0.0]]))
        assert counts.tolist() == [2, 1, 0]
        torch.testing.assert_close(bn, torch.tensor([1.0, 1.0]))


class _Quantised(torch.nn.Module):
    """An encoder and a vector quantiser: the part of CVQVAE whose codebook syncs on its own."""

    def __init__(self):
        super().__init__()
        from atlas.models.layers import VectorQuantizerEMA

        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(4, 3)
        self.vq = VectorQuantizerEMA(n_codes=8, dim=3, dead_threshold=0.5)

    def forward(self, x):
        out = self.vq(self.encoder(x))
        return out["quantized"].pow(2).mean() + out["commitment"]


def _uneven_worker(rank: int, port: int, out):
    from torch.nn.parallel import DistributedDataParallel

    from atlas.models.layers import broadcast_codebooks, worker_local_codebooks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = DistributedDataParallel(_Quantised())
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randn(16, 4, generator=generator) for _ in range(5 if rank == 0 else 2)]

    def step(x):
        optimiser.zero_grad()
        model(x).backward()
        optimiser.step()

    for x in batches[:2]:  # lockstep: the codebook's all-reduces run on both workers
        step(x)
    with model.join(), worker_local_codebooks():  # rank 0's three extra batches: the uneven tail
        for x in batches[2:]:
            step(x)
    broadcast_codebooks(model.module)
    vq = model.module.vq
    out[rank] = (vq.embedding.clone(), vq.cluster_size.clone(), model.module.encoder.weight.detach().clone())
    dist.destroy_process_group()


def test_an_uneven_tail_keeps_codebooks_and_weights_identical_across_workers():
    """CVQVAE's EMA codebook all-reduces inside forward; DDP's join() does not answer those for a
    worker that ran out of batches, so the tail keeps them local and rank 0's codebook is
    broadcast after it. Without that, gloo aborts on mismatched collectives (2-worker MOp build)."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_uneven_worker, args=(_port(), out), nprocs=2, join=True)
    for a, b in zip(out[0], out[1]):
        torch.testing.assert_close(a, b)
    assert float(out[0][1].sum()) > 0
