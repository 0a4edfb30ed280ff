"""The former home of training, kept so that `from edgetl.train import train` in user scripts still works.

Training lives in the `edgetl.training` package; new code imports from there.
"""
from edgetl.training import TrainResult, train
from edgetl.training.supervised import Trainer

__all__ = ["TrainResult", "Trainer", "train"]
