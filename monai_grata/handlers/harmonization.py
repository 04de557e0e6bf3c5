"""Logging gradient harmonization during UDA training: per-iteration values and the inner-product histogram."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from monai_grata.utils.files import atomic_write

__all__ = ["HARMONIZATION_KEYS", "HarmonizationReport", "harmonization_output_transform"]

HARMONIZATION_KEYS = ("tau1", "tau2", "cos", "conflict", "loss_align", "loss_seg", "loss_disc")


def _first(output: Any) -> dict:
    return output[0] if isinstance(output, (list, tuple)) and output else output


def harmonization_output_transform(output: Any, keys: Sequence[str] = HARMONIZATION_KEYS) -> dict[str, float]:
    """``output_transform`` for ``MLFlowHandler``/``StatsHandler`` on a :class:`~monai_grata.engines.UDATrainer`:
    tau1, tau2, cos, conflict and the losses of the iteration as floats."""
    item = _first(output)
    return {k: float(item[k]) for k in keys if isinstance(item, dict) and k in item}


class HarmonizationReport:
    """Collect ⟨g1, g2⟩ of every iteration; at the end write a histogram PNG (the GH paper's Fig. 2) and a JSON
    summary (iterations, conflicting fraction) to ``output_dir``. It has ``state_dict``/``load_state_dict``, so
    putting it into a ``CheckpointSaver``/``CheckpointLoader`` dict keeps the whole history of a resumed run.
    Distributed, the inner products are those of the rank-averaged gradients (the same on every rank), and only
    rank 0 writes the files.

    Args:
        output_dir: where to write.
        plot_name: the histogram file name.
        json_name: the summary file name.
    """

    def __init__(
        self, output_dir: str, plot_name: str = "inner_products.png", json_name: str = "harmonization.json"
    ) -> None:
        self.output_dir, self.plot_name, self.json_name = output_dir, plot_name, json_name
        self.dots: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _collect(self, engine: Engine) -> None:
        item = _first(engine.state.output)
        if isinstance(item, dict) and "dot" in item:
            self.dots.append(torch.as_tensor(item["dot"]).detach().reshape(()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner products so far, so that a checkpoint carries them across a resumed run."""
        return {"dots": torch.stack(self.dots).cpu() if self.dots else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.dots = list(torch.as_tensor(state["dots"]).reshape(-1).unbind())

    def summary(self) -> dict[str, float]:
        dots = torch.stack(self.dots).cpu() if self.dots else torch.zeros(0)
        finite = dots[torch.isfinite(dots)]
        return {
            "iterations": int(dots.numel()),
            "conflict_fraction": float((finite < 0).float().mean()) if finite.numel() else float("nan"),
        }

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() > 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        summary = self.summary()
        with atomic_write(os.path.join(self.output_dir, self.json_name)) as f:
            json.dump(summary, f, indent=2)
        if summary["iterations"]:
            self.plot()

    def plot(self) -> str:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dots = torch.stack(self.dots).cpu()
        dots = dots[torch.isfinite(dots)]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(dots.numpy(), bins=50, color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="tab:red", linestyle="--")
        ax.set_xlabel("inner product of g1 (alignment) and g2 (segmentation)")
        ax.set_ylabel("iterations")
        ax.set_title(f"conflicting iterations: {100 * float((dots < 0).float().mean()):.1f} %")
        fig.tight_layout()
        path = os.path.join(self.output_dir, self.plot_name)
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        return path
