"""Label maps of two nested structures (optic disc ⊃ cup, spinal cord ⊃ gray matter) and their binary channels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

__all__ = [
    "DiscCupFromLabel",
    "DiscCupFromLabeld",
    "LabelFromDiscCup",
    "LabelFromDiscCupd",
    "LabelFromMasksd",
    "LabelFromNestedChannels",
    "LabelFromNestedChannelsd",
    "NestedChannelsFromLabel",
    "NestedChannelsFromLabeld",
]

#: the names of fundus label values 1 and 2
FUNDUS_STRUCTURES = ("optic disc rim", "optic cup")


def _source_name(img: torch.Tensor) -> str:
    meta = getattr(img, "meta", {}) or {}
    name = meta.get("filename_or_obj")
    return f" in {name!r}" if name else ""


class NestedChannelsFromLabel(Transform):
    """Turn a label map of two nested structures (0 background, 1 outer structure only, 2 inner structure) into two
    binary channels: channel 0 the outer structure including the inner one (label >= 1), channel 1 the inner
    structure (label == 2), so the inner lies inside the outer as the anatomy requires (optic disc ⊃ cup, spinal
    cord ⊃ gray matter); both are float tensors for sigmoid losses and for metrics.

    Args:
        allowed: the label values the map may hold; any other value raises ``ValueError``.
        structures: the names of label values 1 and 2, for the error message.
    """

    def __init__(
        self, allowed: tuple[int, ...] = (0, 1, 2), structures: tuple[str, str] = ("outer structure", "inner structure")
    ) -> None:
        self.allowed, self.structures = tuple(allowed), tuple(structures)

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            label: a label map of shape (1, *spatial) (or (*spatial) without channel).

        Returns:
            A float tensor of shape (2, *spatial): [outer structure, inner structure].
        """
        label = convert_to_tensor(label, track_meta=True)
        if label.ndim >= 3 and label.shape[0] != 1:
            raise ValueError(f"label map must have one channel, got shape {tuple(label.shape)}{_source_name(label)}")
        values = torch.unique(label)
        allowed = torch.tensor(self.allowed, dtype=values.dtype, device=values.device)
        bad = values[~torch.isin(values, allowed)]
        if bad.numel():
            raise ValueError(
                f"label values {bad.tolist()[:10]} outside {list(self.allowed)}{_source_name(label)}"
                f" (expected 0 background, 1 {self.structures[0]}, 2 {self.structures[1]})"
            )
        lab = label[0] if label.ndim >= 3 else label
        out = torch.stack([lab >= 1, lab == 2]).to(torch.float32)
        if hasattr(label, "meta"):
            out = convert_to_tensor(out, track_meta=True)
            out.meta = dict(label.meta)
            out.applied_operations = list(getattr(label, "applied_operations", []))
        return out


class NestedChannelsFromLabeld(MapTransform):
    """Dictionary version of :class:`NestedChannelsFromLabel`.

    Args:
        keys: keys of the label maps to convert.
        allowed: the label values the map may hold.
        allow_missing_keys: do not raise when a key is absent (e.g. unlabelled target images).
        structures: the names of label values 1 and 2, for the error message.
    """

    def __init__(
        self,
        keys: KeysCollection,
        allowed: tuple[int, ...] = (0, 1, 2),
        allow_missing_keys: bool = False,
        structures: tuple[str, str] = ("outer structure", "inner structure"),
    ):
        super().__init__(keys, allow_missing_keys)
        self.converter = NestedChannelsFromLabel(allowed, structures)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class DiscCupFromLabel(NestedChannelsFromLabel):
    """:class:`NestedChannelsFromLabel` of fundus labels (0 background, 1 disc rim, 2 cup): [optic disc, optic cup].

    Args:
        allowed: the label values the map may hold; any other value raises ``ValueError``.
    """

    def __init__(self, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
        super().__init__(allowed, FUNDUS_STRUCTURES)


class DiscCupFromLabeld(NestedChannelsFromLabeld):
    """Dictionary version of :class:`DiscCupFromLabel`.

    Args:
        keys: keys of the label maps to convert.
        allowed: the label values the map may hold.
        allow_missing_keys: do not raise when a key is absent (e.g. unlabelled target images).
    """

    def __init__(self, keys: KeysCollection, allowed: tuple[int, ...] = (0, 1, 2), allow_missing_keys: bool = False):
        super().__init__(keys, allowed, allow_missing_keys, FUNDUS_STRUCTURES)


class LabelFromNestedChannels(Transform):
    """The inverse of :class:`NestedChannelsFromLabel`: binary [outer structure, inner structure] channels to one
    label map.

    The output holds 0 background, 1 outer structure only, 2 inner structure (inner pixels outside the outer
    structure count as inner), the format of the input labels, as uint8 for writing PNG/NIfTI masks.

    Args:
        structures: the names of the two channels, for the error message.
    """

    def __init__(self, structures: tuple[str, str] = ("outer structure", "inner structure")) -> None:
        self.structures = tuple(structures)

    def __call__(self, channels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            channels: a (2, *spatial) tensor of 0/1 values (thresholded predictions).

        Returns:
            A (1, *spatial) uint8 label map, keeping the input's metadata.
        """
        if channels.shape[0] != 2:
            names = ", ".join(self.structures)
            raise ValueError(f"expected 2 channels [{names}], got shape {tuple(channels.shape)}")
        outer = channels[0] > 0.5
        inner = channels[1] > 0.5
        label = (outer | inner).to(torch.uint8) + inner.to(torch.uint8)
        return label[None]


class LabelFromNestedChannelsd(MapTransform):
    """Dictionary version of :class:`LabelFromNestedChannels`.

    Args:
        keys: keys of the channel tensors to convert.
        output_keys: keys to write the label maps to (default: in place).
        allow_missing_keys: do not raise when a key is absent.
        structures: the names of the two channels, for the error message.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
        structures: tuple[str, str] = ("outer structure", "inner structure"),
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_keys = (
            self.keys if output_keys is None else tuple([output_keys] if isinstance(output_keys, str) else output_keys)
        )
        self.converter = LabelFromNestedChannels(structures)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.converter(d[key])
        return d


class LabelFromDiscCup(LabelFromNestedChannels):
    """The inverse of :class:`DiscCupFromLabel`: binary [optic disc, optic cup] channels to one label map (0
    background, 1 optic disc rim, 2 optic cup), as :class:`LabelFromNestedChannels` writes it."""

    def __init__(self) -> None:
        super().__init__(("optic disc", "optic cup"))


class LabelFromDiscCupd(LabelFromNestedChannelsd):
    """Dictionary version of :class:`LabelFromDiscCup`.

    Args:
        keys: keys of the channel tensors to convert.
        output_keys: keys to write the label maps to (default: in place).
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(
        self, keys: KeysCollection, output_keys: KeysCollection | None = None, allow_missing_keys: bool = False
    ):
        super().__init__(keys, output_keys, allow_missing_keys, ("optic disc", "optic cup"))


class LabelFromMasksd(MapTransform):
    """Two nested binary masks stored as separate files (e.g. spinal cord and gray matter) to one label map:
    0 background, 1 outer structure only (cord minus gray matter: white matter), 2 inner structure (gray matter),
    the layout :class:`LabelFromNestedChannels` writes. The mask entries are removed; an item without them is left as it
    is (e.g. one that already has a label map).

    Args:
        keys: the (outer, inner) mask keys, each (1, *spatial) with values 0/1.
        label_key: where to write the (1, *spatial) uint8 label map (with the outer mask's metadata).
    """

    def __init__(self, keys: KeysCollection = ("label_cord", "label_gm"), label_key: str = "label") -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise ValueError(f"expected two mask keys (outer, inner), got {self.keys}")
        self.label_key = label_key
        self.converter = LabelFromNestedChannels()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        present = [k for k in self.keys if k in d]
        if not present:
            return d
        if len(present) == 1:
            raise ValueError(f"mask {present[0]!r} without its pair: an item needs both {list(self.keys)}")
        outer, inner = (d.pop(k) for k in self.keys)
        if outer.shape != inner.shape:
            raise ValueError(f"masks {list(self.keys)} differ in shape: {tuple(outer.shape)} vs {tuple(inner.shape)}")
        label = self.converter(torch.cat([outer, inner]).float())
        d[self.label_key] = convert_to_tensor(label, track_meta=True)
        if hasattr(outer, "meta"):
            d[self.label_key].meta = dict(outer.meta)
        return d
