"""The six weak views of GraTa, applied to a whole batch at once, and their exact inverse."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["WEAK_VIEWS", "WeakViews", "WeakViewsd"]

# (flip axes, number of 90-degree rotations), both in the plane of the last two spatial axes, so the
# same views apply to 2D (B, C, H, W) and 3D (B, C, D, H, W) batches.
WEAK_VIEWS: tuple[tuple[tuple[int, ...], int], ...] = (
    ((), 0),  # identity
    ((-1,), 0),  # horizontal flip
    ((-2,), 0),  # vertical flip
    ((), 1),  # rotate 90
    ((), 2),  # rotate 180
    ((), 3),  # rotate 270
)


def _apply(x: torch.Tensor, flip: tuple[int, ...], k: int) -> torch.Tensor:
    if flip:
        x = torch.flip(x, flip)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _undo(x: torch.Tensor, flip: tuple[int, ...], k: int) -> torch.Tensor:
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, flip) if flip else x


class WeakViews(Transform):
    """Stack the weak views of a batch along the batch axis, view-major, for one batched forward.

    ``views(x)`` with ``x`` of shape (B, C, *spatial) returns (V*B, C, *spatial): rows
    ``v*B:(v+1)*B`` hold view ``v`` of the whole batch. ``views.inverse(y)`` takes the network output
    on that stack, (V*B, C', *spatial), and returns (V, B, C', *spatial) with each view mapped back to
    the original frame; ``inverse(views(x))[v] == x`` exactly for every view (flips and 90-degree
    rotations only move pixels). Rotations need equal last two sides.

    Args:
        views: (flip axes, quarter turns) per view; defaults to GraTa's six views
            (identity, h-flip, v-flip, rot 90/180/270).
    """

    def __init__(self, views: Sequence[tuple[tuple[int, ...], int]] = WEAK_VIEWS) -> None:
        if not views:
            raise ValueError("at least one view is required")
        self.views = tuple((tuple(flip), int(k) % 4) for flip, k in views)

    @property
    def num_views(self) -> int:
        return len(self.views)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 4:
            raise ValueError(f"expected a batch (B, C, *spatial) with at least 2 spatial axes, got {tuple(x.shape)}")
        if any(k % 2 for _, k in self.views) and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"90-degree views need square last two sides, got {tuple(x.shape[-2:])}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: a batch of shape (B, C, *spatial).

        Returns:
            The views stacked view-major, shape (V*B, C, *spatial).
        """
        self._check(x)
        return torch.cat([_apply(x, flip, k) for flip, k in self.views], dim=0)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """
        Args:
            y: outputs on the stacked views, shape (V*B, C', *spatial).

        Returns:
            Each view's output in the original frame, shape (V, B, C', *spatial).
        """
        self._check(y)
        if y.shape[0] % self.num_views:
            raise ValueError(f"batch of {y.shape[0]} is not a multiple of {self.num_views} views")
        chunks = y.chunk(self.num_views, dim=0)
        return torch.stack([_undo(c, flip, k) for c, (flip, k) in zip(chunks, self.views, strict=True)])


class WeakViewsd(MapTransform):
    """Dictionary version of :class:`WeakViews`: replaces each key's batch by its stacked views.

    Args:
        keys: keys of the batches to expand.
        views: as :class:`WeakViews`.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        views: Sequence[tuple[tuple[int, ...], int]] = WEAK_VIEWS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = WeakViews(views)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform.inverse(d[key])
        return d
