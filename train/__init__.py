"""Training: ``train_step`` and its state; meshes, checkpoints and the CLI in submodules."""

from train.state import TrainState
from train.step import eval_step, train_step

__all__ = ["TrainState", "eval_step", "train_step"]
