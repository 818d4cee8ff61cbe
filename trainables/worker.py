"""The per-worker loop of a Ray Train `TorchTrainer`: each worker trains its block of the clients.

The `Trainer` splits the clients by `comm.rank / comm.world_size` and all-reduces through `TorchDistributedComm`
(the process group TorchTrainer set up). At every evaluation each worker writes its own state into the checkpoint folder
(Ray Train merges the workers' folders) and all report together; a restarted run (same Train run name) resumes
from the latest checkpoint without repeating finished evaluations.
"""

from __future__ import annotations

import os
import tempfile

import ray.train
import ray.train.torch
import torch

from gradalign.comm import TorchDistributedComm
from gradalign.config import TrainConfig
from gradalign.ray_adapter import GROUP_SEEDS, penalise
from gradalign.ray_adapter._common import COUNTER
from gradalign.ray_adapter.records import update_record
from gradalign.seed_group import build_trainer

from trainables.state import from_bytes, state_file, to_bytes


def train_loop_per_worker(loop_config: dict) -> list[dict]:
    """Train `TrainConfig.from_dict(loop_config["config"])` on this worker's clients; returns the (penalised) metrics
    history. Rank 0 also writes the history and one more training into the trial record at
    `loop_config["history_path"]` (if given) after each checkpoint (`gradalign.ray_adapter.records`).

    On resume the restored evaluation's metrics are reported once more (without a checkpoint): if the driver died after
    that checkpoint was saved but before Tune recorded its metrics, the row is not lost (a duplicate is harmless:
    the results table keeps the last report per evaluation).
    """
    config = TrainConfig.from_dict(loop_config["config"])
    history_path = loop_config.get("history_path")
    context = ray.train.get_context()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    trainer = build_trainer(config, loop_config.get(GROUP_SEEDS), comm=TorchDistributedComm(),
                            device=ray.train.torch.get_device())

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        rank, world = context.get_world_rank(), context.get_world_size()
        with checkpoint.as_directory() as folder:
            path = os.path.join(folder, state_file(rank))
            if not os.path.exists(path):
                raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {rank} of {world} workers "
                                   "(was it written with a different number of workers?)")
            with open(path, "rb") as f:
                trainer.load_state_dict(from_bytes(f.read()))
        if trainer.history:
            ray.train.report(penalise(trainer.history[-1]))

    while not trainer.done:
        metrics = penalise(trainer.train_until_eval())
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, state_file(context.get_world_rank())), "wb") as f:
                f.write(to_bytes(trainer.state_dict()))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        if context.get_world_rank() == 0 and history_path:
            update_record(history_path, [penalise(m) for m in trainer.history], trained_evaluation=metrics[COUNTER])
    return [penalise(m) for m in trainer.history]
