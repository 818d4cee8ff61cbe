"""What a Ray Tune trial runs: the GradAlign Tune trainable and the Ray Train per-worker loop."""

from trainables.trial import fit_torch_trainer, gradalign_trainable, train_in_process
from trainables.worker import train_loop_per_worker

__all__ = ["gradalign_trainable", "train_in_process", "fit_torch_trainer", "train_loop_per_worker"]
