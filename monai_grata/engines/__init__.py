from .inference import (
    JOB_OPTIONS,
    JobInputs,
    check_job_options,
    inference_handlers,
    job_adapter,
    job_inputs,
    job_method,
    prepare_output_dir,
    run_name,
    run_params,
    source_network,
)
from .interrupt import run_interruptibly, stop_when_interrupted
from .steps import job_step
from .uda_trainer import UDATrainer
from .utils import ChannelsLastPrepareBatch, average_gradients, channel_output, mean_over_ranks

__all__ = [
    "JOB_OPTIONS",
    "ChannelsLastPrepareBatch",
    "JobInputs",
    "UDATrainer",
    "average_gradients",
    "channel_output",
    "check_job_options",
    "inference_handlers",
    "job_adapter",
    "job_inputs",
    "job_method",
    "job_step",
    "prepare_output_dir",
    "run_name",
    "run_params",
    "source_network",
    "mean_over_ranks",
    "run_interruptibly",
    "stop_when_interrupted",
]
