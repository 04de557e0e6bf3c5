from .utils import ChannelsLastPrepareBatch, channel_output

__all__ = ["ChannelsLastPrepareBatch", "channel_output"]
