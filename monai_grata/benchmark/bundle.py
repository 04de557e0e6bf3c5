"""What the benchmark takes from a bundle: its task, its network, its source checkpoint(s) and its inferer, read from
the bundle's ``configs/inference.json`` with MONAI's ``ConfigParser``, so the benchmark runs any bundle in-process."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch import nn

from monai_grata.data import TaskSpec, task_of_bundle
from monai_grata.networks import checkpoint_decoder, load_weights

__all__ = ["DEFAULT_BUNDLE", "BundleSetup", "bundle_setup"]

DEFAULT_BUNDLE = "bundles/grata"
#: the config entries the benchmark reads
NETWORK_KEY, INFERER_KEY, CKPT_KEY, PATCHES_KEY = "network_def", "inferer", "ckpt_path", "num_patches"
#: the placeholder of the source domain in a checkpoint path (``str.format``)
SOURCE_FIELD = "{source}"
DEFAULT_NUM_PATCHES = 4  # TTAHandler's default


@dataclass
class BundleSetup:
    """A bundle as the benchmark runs it.

    Args:
        bundle_dir: the bundle's root folder.
        task: the bundle's task (channels, activation, label codec, preprocessing, ...).
        parser: the bundle's inference config, ``bundle_root`` set to ``bundle_dir``.
        checkpoint: the source checkpoint's path, ``{source}`` standing for the source domain.
        inferer: the evaluator's inferer (``None``: the network's own forward).
        num_patches: patches per volume for patch adaptation under a sliding-window inferer.
    """

    bundle_dir: str
    task: TaskSpec
    parser: ConfigParser
    checkpoint: str
    inferer: Callable | None = None
    num_patches: int = DEFAULT_NUM_PATCHES

    @property
    def sliding_window(self) -> bool:
        """Whether volumes are predicted window by window (then adapters adapt on patches, as ``TTAHandler`` does)."""
        return isinstance(self.inferer, SlidingWindowInferer)

    def build_model(self, ckpt_path: str) -> nn.Module:
        """A new instance of the bundle's ``network_def`` with the weights of ``ckpt_path``.

        A config with a ``decoder`` entry (the ResUNet's) gets the decoder that wrote the checkpoint, so the
        authors' checkpoints load beside the bundle's own.
        """
        if "decoder" in self.parser.config:
            self.parser["decoder"] = checkpoint_decoder(ckpt_path)
        network = self.parser.get_parsed_content(NETWORK_KEY, lazy=False)
        return load_weights(network, ckpt_path)

    def preprocessing(self, image_size: int | None = None):
        """The task's scoring preprocessing (``image_size`` for tasks that resize to a square)."""
        return self.task.make_preprocessing(image_size=image_size)


def bundle_setup(bundle_dir: str = DEFAULT_BUNDLE) -> BundleSetup:
    """Read what the benchmark needs from ``bundle_dir/configs/inference.json``.

    Args:
        bundle_dir: the bundle's root folder.

    Raises:
        FileNotFoundError: no inference config.
        KeyError: a config without ``network_def`` or ``ckpt_path``.
    """
    config = os.path.join(bundle_dir, "configs", "inference.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no bundle at {bundle_dir!r}: {config} not found")
    parser = ConfigParser()
    parser.read_config(config)
    missing = [key for key in (NETWORK_KEY, CKPT_KEY) if key not in parser.config]
    if missing:
        raise KeyError(f"{config} has no {missing}: the benchmark builds the network and finds the checkpoint there")
    parser["bundle_root"] = bundle_dir
    parser["source"] = SOURCE_FIELD  # the checkpoint path as a template over the source domain
    checkpoint = os.path.normpath(parser.get_parsed_content(CKPT_KEY))
    inferer = parser.get_parsed_content(INFERER_KEY) if INFERER_KEY in parser.config else None
    num_patches = int(parser.get_parsed_content(PATCHES_KEY)) if PATCHES_KEY in parser.config else DEFAULT_NUM_PATCHES
    return BundleSetup(bundle_dir, task_of_bundle(bundle_dir), parser, checkpoint, inferer, num_patches)
