"""The weak views of GraTa (flips and quarter turns), for 2D and 3D batches at once, and their exact inverse."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = ["IN_PLANE_3D", "WEAK_VIEWS", "WEAK_VIEWS_3D", "WeakViews", "WeakViewsd", "weak_views"]

#: the plane of the quarter turns by default: the last two axes (a 2D image's (H, W))
LAST_PLANE = (-2, -1)
#: the in-plane axes of a MONAI volume (B, C, H, W, D) of axial slices (the slice axis D last, as NIfTI stores it)
IN_PLANE_3D = (-3, -2)

# (flip axes, number of 90-degree rotations), both in the plane of the last two spatial axes; a view may add a
# third entry, the plane of its rotations (default: the last two axes).
WEAK_VIEWS: tuple[tuple[tuple[int, ...], int], ...] = (
    ((), 0),  # identity
    ((-1,), 0),  # horizontal flip
    ((-2,), 0),  # vertical flip
    ((), 1),  # rotate 90
    ((), 2),  # rotate 180
    ((), 3),  # rotate 270
)


def weak_views(
    spatial_dims: int = 3,
    flip_axes: Sequence[int] | None = None,
    rotations: Sequence[int] = (1, 2, 3),
    plane: tuple[int, int] | None = None,
) -> tuple[tuple[tuple[int, ...], int, tuple[int, int]], ...]:
    """The identity, one flip per axis in ``flip_axes`` and one quarter-turn rotation per entry of ``rotations``.

    Args:
        spatial_dims: 2 (images, (B, C, H, W)) or 3 (volumes, (B, C, H, W, D)).
        flip_axes: the axes flipped, one view each, as negative axes of the batch (default: every spatial axis).
        rotations: the numbers of quarter turns, one view each (0 or empty: no rotation views).
        plane: the plane of the rotations (default: the last two axes in 2D, :data:`IN_PLANE_3D` in 3D).

    Returns:
        Views as :class:`WeakViews` takes them: (flip axes, quarter turns, plane).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    plane = tuple(plane) if plane is not None else (LAST_PLANE if spatial_dims == 2 else IN_PLANE_3D)
    axes = tuple(range(-spatial_dims, 0)) if flip_axes is None else tuple(flip_axes)
    for axis in axes + plane:
        if not -spatial_dims <= axis < 0:
            raise ValueError(f"axes must be negative spatial axes in [{-spatial_dims}, -1], got {axis}")
    views = [((), 0, plane)] + [((a,), 0, plane) for a in axes]
    return tuple(views + [((), int(k) % 4, plane) for k in rotations if int(k) % 4])


#: GraTa's views for volumes (B, C, H, W, D): identity, a flip along each spatial axis, and rotations by 90, 180 and
#: 270 degrees in the axial plane (H, W), seven in all
WEAK_VIEWS_3D = weak_views(3)


def _apply(x: torch.Tensor, flip: tuple[int, ...], k: int, plane: tuple[int, int]) -> torch.Tensor:
    if flip:
        x = torch.flip(x, flip)
    return torch.rot90(x, k, dims=plane) if k else x


def _undo(x: torch.Tensor, flip: tuple[int, ...], k: int, plane: tuple[int, int]) -> torch.Tensor:
    if k:
        x = torch.rot90(x, -k, dims=plane)
    return torch.flip(x, flip) if flip else x


class WeakViews(Transform):
    """Stack the weak views of a batch along the batch axis, view-major, for one batched forward.

    ``views(x)`` with ``x`` of shape (B, C, *spatial) returns (V*B, C, *spatial): rows
    ``v*B:(v+1)*B`` hold view ``v`` of the whole batch. ``views.inverse(y)`` takes the network output
    on that stack, (V*B, C', *spatial), and returns (V, B, C', *spatial) with each view mapped back to
    the original frame; ``inverse(views(x))[v] == x`` exactly for every view (flips and 90-degree
    rotations only move pixels). Rotations need equal sides in their plane.

    Args:
        views: (flip axes, quarter turns) or (flip axes, quarter turns, rotation plane) per view; defaults to
            GraTa's six views (identity, h-flip, v-flip, rot 90/180/270 in the last two axes).
            :data:`WEAK_VIEWS_3D` and :func:`weak_views` give views of volumes.
    """

    def __init__(self, views: Sequence[tuple] = WEAK_VIEWS) -> None:
        if not views:
            raise ValueError("at least one view is required")
        self.views = tuple(
            (tuple(view[0]), int(view[1]) % 4, tuple(view[2]) if len(view) > 2 else LAST_PLANE) for view in views
        )

    @property
    def num_views(self) -> int:
        return len(self.views)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 4:
            raise ValueError(f"expected a batch (B, C, *spatial) with at least 2 spatial axes, got {tuple(x.shape)}")
        for _, k, plane in self.views:
            if k % 2 and x.shape[plane[0]] != x.shape[plane[1]]:
                sides = (x.shape[plane[0]], x.shape[plane[1]])
                raise ValueError(f"90-degree views need square sides in their plane {plane}, got {sides}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: a batch of shape (B, C, *spatial).

        Returns:
            The views stacked view-major, shape (V*B, C, *spatial).
        """
        self._check(x)
        return torch.cat([_apply(x, *view) for view in self.views], dim=0)

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
        return torch.stack([_undo(c, *view) for c, view in zip(chunks, self.views, strict=True)])


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
        views: Sequence[tuple] = WEAK_VIEWS,
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
