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
