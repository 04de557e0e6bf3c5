from .interrupt import run_interruptibly
from .uda_trainer import UDATrainer
from .utils import ChannelsLastPrepareBatch, average_gradients, channel_output, mean_over_ranks

__all__ = [
    "ChannelsLastPrepareBatch",
    "UDATrainer",
    "average_gradients",
    "channel_output",
    "mean_over_ranks",
    "run_interruptibly",
]
