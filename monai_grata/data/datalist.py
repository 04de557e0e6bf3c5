"""Finding the images (and labels) of a domain: a decathlon-style datalist or a plain folder."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from monai.data import load_decathlon_datalist

from .checks import BadInputError, MissingInputError

__all__ = ["IMAGE_SUFFIXES", "domain_datalist", "folder_datalist", "split_train_val", "target_datalist"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz")


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_files(items: Sequence[dict], what: str) -> list[dict]:
    if not items:
        raise BadInputError(f"empty dataset: no images found for {what}")
    for item in items:
        for key in ("image", "label"):
            if key in item and not os.path.isfile(item[key]):
                raise MissingInputError(f"{key} file not found: {item[key]!r} (listed for {what})")
    return list(items)


def folder_datalist(image_dir: str, label_dir: str | None = None) -> list[dict]:
    """List the images of a folder, with the label of the same name when ``label_dir`` has one.

    Args:
        image_dir: a folder of PNG/JPG or NIfTI images.
        label_dir: an optional folder of label maps whose file names (without suffix) match the images.

    Returns:
        Sorted ``[{"image": path, "label": path}, ...]`` (no ``"label"`` for unlabelled images).

    Raises:
        FileNotFoundError: when ``image_dir`` does not exist.
        ValueError: when it holds no image.
    """
    if not os.path.isdir(image_dir):
        raise MissingInputError(f"image folder not found: {image_dir!r}")
    images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    labels = {}
    if label_dir is not None and os.path.isdir(label_dir):
        labels = {
            _stem(f): os.path.join(label_dir, f) for f in os.listdir(label_dir) if f.lower().endswith(IMAGE_SUFFIXES)
        }
    items = []
    for name in images:
        item = {"image": os.path.join(image_dir, name)}
        if _stem(name) in labels:
            item["label"] = labels[_stem(name)]
        items.append(item)
    return _check_files(items, f"folder {image_dir!r}")


def domain_datalist(dataset_dir: str, domain: str | None = None, datalist: str | None = None) -> list[dict]:
    """The images of one domain, from a datalist when there is one, else from folders.

    Args:
        dataset_dir: the dataset root; datalist paths are relative to it.
        domain: the datalist key (e.g. ``"refuge_train"``). Without a datalist, the images are read from
            ``dataset_dir/domain/images`` (labels from ``.../labels``); with ``domain=None`` from
            ``dataset_dir`` itself (a plain folder of images, optionally with a ``labels`` subfolder).
        datalist: a decathlon-style JSON file mapping each domain to ``[{"image", "label"}, ...]``;
            defaults to ``dataset_dir/datalist.json`` when that file exists and ``domain`` is given.

    Raises:
        FileNotFoundError: a missing datalist, folder, image or label file.
        ValueError: an unknown domain or an empty dataset.
    """
    if datalist is None and domain is not None and os.path.isfile(os.path.join(dataset_dir, "datalist.json")):
        datalist = os.path.join(dataset_dir, "datalist.json")
    if datalist is not None:
        if not os.path.isfile(datalist):
            raise MissingInputError(f"datalist not found: {datalist!r}")
        with open(datalist) as f:
            keys = list(json.load(f))
        if domain not in keys:
            raise BadInputError(f"domain {domain!r} not in datalist {datalist!r}; it has {keys}")
        items = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key=domain, base_dir=dataset_dir)
        return _check_files(items, f"domain {domain!r} of {datalist!r}")
    root = dataset_dir if domain is None else os.path.join(dataset_dir, domain)
    image_dir = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
    return folder_datalist(image_dir, os.path.join(root, "labels"))


def split_train_val(items: Sequence[dict], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A deterministic train/validation split (the same ``seed`` always gives the same split).

    Args:
        items: the datalist to split.
        val_fraction: the share of items held out for validation, in (0, 1).
        seed: the seed of the shuffle.

    Returns:
        (train items, validation items), each in the datalist's order.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(items) < 2:
        raise BadInputError(f"need at least 2 items to split, got {len(items)}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * val_fraction))
    val = set(order[:n_val])
    return [it for i, it in enumerate(items) if i not in val], [it for i, it in enumerate(items) if i in val]


def target_datalist(
    dataset_dir: str,
    target: str | Sequence[str] | None = None,
    source: str | None = None,
    datalist: str | None = None,
) -> list[dict]:
    """The images to adapt to, each tagged with its ``"domain"``, domain after domain.

    Args:
        dataset_dir: the dataset root, or a plain folder of images (with an optional ``labels`` subfolder).
        target: one domain, a list of domains, or ``None`` for every domain of the datalist except ``source``
            (or, without a datalist, the folder ``dataset_dir`` itself).
        source: the source domain, left out when ``target`` is ``None``.
        datalist: a decathlon-style JSON file; defaults to ``dataset_dir/datalist.json`` when it exists.
    """
    if datalist is None and os.path.isfile(os.path.join(dataset_dir, "datalist.json")):
        datalist = os.path.join(dataset_dir, "datalist.json")
    if target is None:
        if datalist is None:
            name = os.path.basename(os.path.normpath(dataset_dir))
            return [dict(item, domain=name) for item in domain_datalist(dataset_dir)]
        if not os.path.isfile(datalist):
            raise MissingInputError(f"datalist not found: {datalist!r}")
        with open(datalist) as f:
            target = [domain for domain in json.load(f) if domain != source]
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise BadInputError(f"no target domain to adapt to (source {source!r})")
    return [dict(item, domain=d) for d in targets for item in domain_datalist(dataset_dir, d, datalist)]
