"""The same algorithm spread over two gloo processes gives the single-process numbers (float64)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import tiny_model
from test_algorithms import CLIENTS, batches, config, make_data

from gradalign import ALGORITHMS
from gradalign.algorithms import RoundBatch, build_algorithm
from gradalign.comm import TorchDistributedComm, block_of
from gradalign.functional import flat_params

ROUNDS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(batch: RoundBatch, ids: list[int]) -> RoundBatch:
    rows = [batch.client_ids.index(c) for c in ids if c in batch.client_ids]
    return RoundBatch(
        [batch.client_ids[r] for r in rows],
        batch.inputs[rows],
        batch.targets[rows],
        batch.num_participants,
        batch.diagnose,
    )


def _worker(rank, world, port, algorithms, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = TorchDistributedComm()
        mine = block_of(CLIENTS, world, rank)
        results = {}
        for name in algorithms:
            cfg = config(name, momentum=0.5)
            model = tiny_model()
            algo = build_algorithm(model, F.cross_entropy, cfg, comm)
            steps = [algo.step(_local(b, mine)) for b in batches(make_data(), ROUNDS, k=cfg.local_steps)]
            results[name] = (
                flat_params(model),
                [s.loss for s in steps],
                [s.alignment.grad_variance if s.alignment else None for s in steps],
            )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), ALGORITHMS, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ALGORITHMS:
        cfg = config(name, momentum=0.5)
        model = tiny_model()
        algo = build_algorithm(model, F.cross_entropy, cfg)
        steps = [algo.step(b) for b in batches(make_data(), ROUNDS, k=cfg.local_steps)]
        for rank in ranks:
            params, losses, variances = rank[name]
            torch.testing.assert_close(params, flat_params(model), rtol=1e-6, atol=1e-9, msg=name)
            assert losses == pytest.approx([s.loss for s in steps], rel=1e-6), name
            expected = [s.alignment.grad_variance if s.alignment else None for s in steps]
            assert variances == pytest.approx(expected, rel=1e-6), name
