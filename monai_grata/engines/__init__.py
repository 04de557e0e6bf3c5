from .uda_trainer import UDATrainer
from .utils import ChannelsLastPrepareBatch, channel_output

__all__ = ["ChannelsLastPrepareBatch", "UDATrainer", "channel_output"]
