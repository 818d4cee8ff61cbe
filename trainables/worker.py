"""The per-worker loop of a Ray Train `TorchTrainer`: each worker trains its block of the clients.

The `Trainer` splits the clients by `comm.rank / comm.world_size` and all-reduces through `TorchDistributedComm`
(the process group TorchTrainer set up). After every evaluation each worker saves its own state to a file of its own
(`WorkerStates`) and rank 0 records the history; reports to Ray Train (which forwards rank 0's to Tune) follow the
trial's `ReportSchedule`, decided on rank 0 and broadcast, since every worker must report together. No Ray Train
checkpoints: a report blocks until Train's controller has taken the previous one (it polls every 2 s), and a
checkpoint at every evaluation cost seconds each. A restarted run (same run name, or a worker-group retry) resumes
from the latest evaluation that every worker saved, without repeating finished evaluations.
"""

from __future__ import annotations

import os

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from gradalign.comm import TorchDistributedComm
from gradalign.config import TrainConfig
from gradalign.ray_adapter import GROUP_SEEDS, penalise
from gradalign.ray_adapter._common import COUNTER
from gradalign.ray_adapter.records import update_record
from gradalign.seed_group import build_trainer
from trainables.report_schedule import ReportSchedule
from trainables.state import from_bytes, read_if_exists, to_bytes, write_atomic


class WorkerStates:
    """One worker's saved states in `folder`: `w{world}-rank{rank}-eval{n}.pt`, the latest two kept.

    Workers save one after another, so after a kill one may hold evaluation n and another only n - 1: keeping two
    lets every worker go back to the latest evaluation all of them hold.
    """

    KEEP = 2

    def __init__(self, folder: str, rank: int, world: int):
        self.folder, self.rank, self.world = folder.rstrip("/"), rank, world
        self._fs, self._path = pyarrow.fs.FileSystem.from_uri(self.folder)
        self._prefix = f"w{world}-rank{rank}-eval"

    def evaluations(self) -> list[int]:
        """The evaluations this worker has a state for, oldest first."""
        selector = pyarrow.fs.FileSelector(self._path, allow_not_found=True)
        found = []
        for info in self._fs.get_file_info(selector):
            name = info.base_name
            if name.startswith(self._prefix) and name.endswith(".pt"):
                found.append(int(name[len(self._prefix) : -3]))
        return sorted(found)

    def uri(self, evaluation: int) -> str:
        return f"{self.folder}/{self._prefix}{evaluation:05d}.pt"

    def save(self, evaluation: int, data: bytes) -> None:
        write_atomic(self.uri(evaluation), data)
        for old in self.evaluations()[: -self.KEEP]:
            self.delete(old)

    def delete(self, evaluation: int) -> None:
        self._fs.delete_file(f"{self._path}/{self._prefix}{evaluation:05d}.pt")

    def load(self, evaluation: int) -> bytes:
        data = read_if_exists(self.uri(evaluation))
        if data is None:
            raise RuntimeError(
                f"worker {self.rank} of {self.world} has no saved state for evaluation {evaluation} "
                f"in {self.folder} (it holds {self.evaluations()})"
            )
        return data


def train_loop_per_worker(loop_config: dict) -> list[dict]:
    """Train `TrainConfig.from_dict(loop_config["config"])` on this worker's clients; returns the (penalised) metrics
    history. Every worker saves its state under `loop_config["state_dir"]` after each evaluation; rank 0 then writes
    the history and one more training into the trial record at `loop_config["history_path"]` (if given)
    (`gradalign.ray_adapter.records`).

    On resume the restored evaluation's metrics are reported once more: if the driver died after that evaluation was
    saved but before Tune recorded its metrics, the row is not lost (a duplicate is harmless: the results table keeps
    the last report per evaluation).
    """
    config = TrainConfig.from_dict(loop_config["config"])
    history_path = loop_config.get("history_path")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = ray.train.torch.get_device()
    trainer = build_trainer(config, loop_config.get(GROUP_SEEDS), comm=TorchDistributedComm(), device=device)
    states = WorkerStates(loop_config["state_dir"], rank, world)
    schedule = ReportSchedule(loop_config.get("report_interval_s", 0.0), loop_config.get("report_rungs", ()))

    saved = states.evaluations()
    common = _reduce(saved[-1] if saved else 0, dist.ReduceOp.MIN, device)  # the latest all workers hold
    if common > 0:
        trainer.load_state_dict(from_bytes(states.load(common)))
        schedule.restored(trainer.history[-1])
        ray.train.report(penalise(trainer.history[-1]))

    while not trainer.done:
        metrics = penalise(trainer.train_until_eval())
        states.save(metrics[COUNTER], to_bytes(trainer.state_dict()))
        if rank == 0 and history_path:
            update_record(history_path, [penalise(m) for m in trainer.history], trained_evaluation=metrics[COUNTER])
        if _reduce(int(rank == 0 and schedule.due(metrics, last=trainer.done)), dist.ReduceOp.MAX, device):
            ray.train.report(metrics)
    return [penalise(m) for m in trainer.history]


def _reduce(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    """`value` reduced over the workers with `op` (one tiny all-reduce)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())
