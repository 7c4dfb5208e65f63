"""Training: the distributed set-up, the DeepSpeed engine, checkpoints and the trainer loop."""

from mmscale.training.distributed import init_distributed, shutdown_distributed
from mmscale.training.engine import build_engine
from mmscale.training.trainer import Trainer

__all__ = ["Trainer", "build_engine", "init_distributed", "shutdown_distributed"]
