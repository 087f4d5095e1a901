"""Training: ``train_step`` and its state; meshes, checkpoints and the CLI in submodules."""

from jpeft.train.state import TrainState
from jpeft.train.step import eval_step, train_step

__all__ = ["TrainState", "eval_step", "train_step"]
