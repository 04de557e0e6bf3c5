"""What one adaptation step reports: typed statistics, one dataclass per kind of method.

Every step says whether it changed the adapter's state (``updated``), was skipped for a non-finite input or rolled
back for non-finite weights; a method's subclass adds its own quantities as 0-dim tensors (read by the caller when it
wants them, so the step itself never waits for the device). :meth:`AdaptationStep.scalars` names them for logging.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

__all__ = ["AdaptationStep"]

_FLAGS = ("updated", "skipped", "rolled_back")


@dataclasses.dataclass(kw_only=True)
class AdaptationStep:
    """The statistics of one adaptation step.

    Subclasses add the method's quantities as fields holding 0-dim tensors, or ``None`` where the step did not
    compute them (e.g. GraTa's losses on a batch its shift gate held).

    Args:
        updated: whether the step changed what the method adapts (:attr:`changes`).
        skipped: the batch had non-finite values and was not adapted on.
        rolled_back: the update left non-finite weights and was undone.
    """

    #: what an update changes, as the run summary names it; None: nothing that persists between batches
    changes: ClassVar[str | None] = "the weights"

    updated: bool = True
    skipped: bool = False
    rolled_back: bool = False

    def scalars(self) -> dict[str, torch.Tensor]:
        """The statistics to log, by name: the method's fields that are set, then ``skipped`` and ``rolled_back``
        (1.0) when they happened."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _FLAGS}
        values = {name: value for name, value in values.items() if value is not None}
        for flag in ("skipped", "rolled_back"):
            if getattr(self, flag):
                values[flag] = torch.tensor(1.0)
        return values
