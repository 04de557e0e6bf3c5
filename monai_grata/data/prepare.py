"""Turn public data sets, as their publishers distribute them, into the datalist layout the bundles read.

    python -m monai_grata.data.prepare refuge --source REFUGE --output data/fundus --split train val
    python -m monai_grata.data.prepare drishti --source Drishti-GS1_files --output data/fundus
    python -m monai_grata.data.prepare rimone --source RIM-ONE_DL --output data/fundus
    python -m monai_grata.data.prepare gmchallenge --source gm-challenge-data --output data/spinalcord

Fundus photographs (REFUGE, Drishti-GS1, RIM-ONE DL) become square crops centred on the ground-truth optic disc
(the centre of the disc's bounding box), resized to ``--size`` (default 256): ``<output>/<domain>/images/<id>.png``
(RGB) and ``<output>/<domain>/labels/<id>.png`` (0 background, 1 optic disc rim, 2 optic cup). The crop side is
``--crop``: a number of pixels of the original photograph (``512``, the default for REFUGE and Drishti-GS1, as the
shipped fundus data) or a multiple of the disc diameter, the larger side of its bounding box (``1.6x``, the default
for RIM-ONE DL, whose photographs are already cropped around the disc). Parts of a crop outside the photograph are
black. Masks are resized as binary maps (bilinear, then threshold 0.5), so a label keeps its structures' edges.

The Spinal Cord Gray Matter Imaging Challenge data (BIDS, ``sct-pipeline/gm-challenge-data``) become NIfTI copies
per site: ``<output>/<site>/images/<subject>_T2starw.nii.gz`` and ``<output>/<site>/labels/<subject>_cord.nii.gz``,
``..._gm.nii.gz`` (the manual masks, on the image's grid), listed as ``{"image", "label_gm", "label_cord"}``.

Each run writes ``<output>/datalist.json`` (MONAI's ``load_decathlon_datalist(path, data_list_key=DOMAIN)`` reads
it), merged into the file already there: several data sets can be prepared into one folder, and preparing a domain
again replaces its list. Images without a mask are skipped with a warning. docs/data.md says where each data set is
published, under which licence, and which of its files each command reads.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from PIL import Image

from .checks import BadInputError, MissingInputError

__all__ = [
    "GMCHALLENGE_SITES",
    "CropSize",
    "FundusCase",
    "crop_around_disc",
    "disc_cup_label",
    "parse_crop",
    "prepare_drishti",
    "prepare_fundus",
    "prepare_gmchallenge",
    "prepare_refuge",
    "prepare_rimone",
    "update_datalist",
]

logger = logging.getLogger(__name__)

DATALIST_NAME = "datalist.json"
# How deep below --source the folders of a distribution are looked for (archives unpack with or without a
# top folder of their own name, e.g. REFUGE-Training400/Training400/...).
SEARCH_DEPTH = 4

# The sites the manually segmented subjects of gm-challenge-data were scanned at, by the names the project's
# spinal-cord results use. ``--site SUBJECT=NAME`` adds or overrides one.
GMCHALLENGE_SITES = {
    "sub-9418": "ucl",
    "sub-9584": "nwu",
    "sub-9604": "philips",
    "sub-9669": "juntendo",
    "sub-9709Ses1": "milan",
    "sub-9709Ses2": "milan",
    "sub-10062Ses1": "ceitec",
    "sub-10062Ses2": "ceitec",
}

REFUGE_SPLITS = {
    # split: (default domain, image folder, mask folder); the archives are "<image folder>.zip" (REFUGE- prefixed
    # for the training and test images) and "<mask folder>.zip"
    "train": ("refuge_train", "Training400", "Annotation-Training400"),
    "val": ("refuge_val", "REFUGE-Validation400", "REFUGE-Validation400-GT"),
    "test": ("refuge_test", "Test400", "REFUGE-Test-GT"),
}
DRISHTI_SPLITS = {"train": ("Training", ("GT",)), "test": ("Test", ("Test_GT", "GT"))}
RIMONE_PARTITIONS = {"by_hospital": "partitioned_by_hospital", "randomly": "partitioned_randomly"}
RIMONE_SPLITS = {"train": "training_set", "test": "test_set"}
RIMONE_MASK = re.compile(r"^(?P<case>.+)-(?P<rater>\d+)-(?P<kind>Disc|Cup)-T\.png$", re.IGNORECASE)


@dataclass(frozen=True)
class CropSize:
    """The side of a square crop: ``value`` pixels of the original photograph, or ``value`` times the optic disc's
    diameter (the larger side of its bounding box) when ``per_disc``.

    Args:
        value: pixels, or the multiple of the disc diameter; positive.
        per_disc: whether ``value`` is a multiple of the disc diameter.
    """

    value: float
    per_disc: bool = False

    def side(self, disc_diameter: int) -> int:
        """The crop side in pixels for a disc of ``disc_diameter`` pixels (at least 1)."""
        return max(1, round(self.value * disc_diameter if self.per_disc else self.value))

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.per_disc else f"{self.value:g}"


def parse_crop(text: str | float | CropSize) -> CropSize:
    """A crop side from ``"512"`` (pixels) or ``"1.6x"`` (times the disc diameter).

    Args:
        text: the option's value; a number means pixels; a :class:`CropSize` is returned as it is.

    Raises:
        BadInputError: a value that is not a positive number, with or without a trailing ``x``.
    """
    if isinstance(text, CropSize):
        return text
    raw = str(text).strip().lower()
    per_disc = raw.endswith("x")
    try:
        value = float(raw[:-1] if per_disc else raw)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise BadInputError(
            f"--crop {text!r} is not a crop side: give pixels of the photograph (e.g. 512) or a multiple of the "
            "optic disc diameter (e.g. 1.6x)"
        )
    return CropSize(value, per_disc)


@dataclass(frozen=True)
class FundusCase:
    """One photograph and the reader of its optic disc and cup masks.

    Args:
        case_id: the file name (without suffix) the prepared image and label get.
        image: the photograph's path.
        masks: the mask files ``read_masks`` takes.
        read_masks: returns boolean (disc, cup) arrays of the photograph's height and width from ``masks``.
    """

    case_id: str
    image: str
    masks: tuple[str, ...]
    read_masks: Callable[..., tuple[np.ndarray, np.ndarray]]


def _gray(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def refuge_disc_cup(path: str) -> tuple[np.ndarray, np.ndarray]:
    """REFUGE's BMP mask (0 optic cup, 128 optic disc rim, 255 background) as boolean (disc, cup) maps.

    The thresholds sit halfway between the three values (below 192: disc; below 64: cup).

    Args:
        path: the ``Disc_Cup_Masks/.../<id>.bmp`` file.
    """
    mask = _gray(path)
    return mask < 192, mask < 64


def _check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise BadInputError(f"--softmap_threshold must be in (0, 1], got {threshold}")


def softmap_disc_cup(disc_path: str, cup_path: str, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Drishti-GS1's soft maps (the share of the experts who marked a pixel, 0–255) as boolean (disc, cup) maps.

    Args:
        disc_path: the ``<id>_ODsegSoftmap.png`` file.
        cup_path: the ``<id>_cupsegSoftmap.png`` file.
        threshold: the least share of the experts, in (0, 1]; 0.5 keeps pixels at least half of them marked
            (a half stored as 127 or 128 both count).
    """
    _check_threshold(threshold)
    least = threshold * 255 - 0.5
    return _gray(disc_path) >= least, _gray(cup_path) >= least


def binary_disc_cup(disc_path: str, cup_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Two binary PNG masks (255 inside the structure, 0 outside, as RIM-ONE DL's) as boolean (disc, cup) maps.

    Args:
        disc_path: the ``<case>-1-Disc-T.png`` file.
        cup_path: the ``<case>-1-Cup-T.png`` file.
    """
    return _gray(disc_path) >= 128, _gray(cup_path) >= 128


def disc_cup_label(disc: np.ndarray, cup: np.ndarray) -> np.ndarray:
    """A label map (0 background, 1 optic disc rim, 2 optic cup) from boolean disc and cup maps; cup pixels
    outside the disc count as cup (the cup lies inside the disc).

    Args:
        disc: (H, W) boolean optic disc (including the cup).
        cup: (H, W) boolean optic cup.
    """
    return (disc | cup).astype(np.uint8) + cup.astype(np.uint8)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _crop_square(array: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """``array[top:top+side, left:left+side]``, zero where the window leaves the array."""
    out = np.zeros((side, side) + array.shape[2:], dtype=array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, array.shape[0]), min(left + side, array.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized to ``shape`` (H, W) as a map (bilinear) thresholded at one half."""
    if mask.shape == shape:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(img) >= 128


def crop_around_disc(
    image: np.ndarray, disc: np.ndarray, cup: np.ndarray, crop: CropSize, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A square crop centred on the optic disc (its bounding box's centre), resized to ``size``.

    Args:
        image: (H, W, 3) uint8 photograph.
        disc: (H, W) boolean optic disc.
        cup: (H, W) boolean optic cup.
        crop: the crop side (pixels, or a multiple of the disc diameter).
        size: the side of the output image and label.

    Returns:
        ((size, size, 3) uint8 image, (size, size) uint8 label with 0 background, 1 disc rim, 2 cup).

    Raises:
        BadInputError: an empty disc mask.
    """
    box = _bounding_box(disc)
    if box is None:
        raise BadInputError("the optic disc mask is empty")
    y0, y1, x0, x1 = box
    side = crop.side(max(y1 - y0, x1 - x0) + 1)
    top = math.floor((y0 + y1 + 1 - side) / 2 + 0.5)
    left = math.floor((x0 + x1 + 1 - side) / 2 + 0.5)
    window = _crop_square(image, top, left, side)
    window = np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR))
    disc_crop, cup_crop = (_resize_mask(_crop_square(m, top, left, side), (size, size)) for m in (disc, cup))
    return window, disc_cup_label(disc_crop, cup_crop)


def _read_case(case: FundusCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The photograph (RGB) and its disc and cup maps, the maps brought to the photograph's size if they differ."""
    with Image.open(case.image) as img:
        image = np.asarray(img.convert("RGB"))
    disc, cup = case.read_masks(*case.masks)
    if disc.shape != image.shape[:2] or cup.shape != image.shape[:2]:
        logger.warning(
            "%s: masks are %s, the photograph %s; resizing the masks", case.case_id, disc.shape, image.shape[:2]
        )
        disc, cup = (_resize_mask(m, image.shape[:2]) for m in (disc, cup))
    return image, disc, cup


def prepare_fundus(
    cases: Sequence[FundusCase], output: str, domain: str, size: int = 256, crop: str | CropSize = "512"
) -> list[dict]:
    """Write disc-centred crops of ``cases`` to ``<output>/<domain>/{images,labels}/<id>.png``.

    Args:
        cases: the photographs and their masks.
        output: the prepared data set's root.
        domain: the domain's folder and datalist key.
        size: the side of the written images and labels.
        crop: the crop side (see :func:`parse_crop`).

    Returns:
        ``[{"image", "label"}, ...]`` paths relative to ``output``, one per written case (cases with an empty disc
        mask are skipped with a warning).
    """
    if int(size) <= 0:
        raise BadInputError(f"--size must be a positive number of pixels, got {size}")
    crop = parse_crop(crop)
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(output, domain, sub), exist_ok=True)
    items = []
    for case in cases:
        image, disc, cup = _read_case(case)
        if not disc.any():
            logger.warning("skipped %s: its optic disc mask %s is empty", case.image, case.masks[0])
            continue
        image, label = crop_around_disc(image, disc, cup, crop, int(size))
        item = {key: f"{domain}/{key}s/{case.case_id}.png" for key in ("image", "label")}
        Image.fromarray(image).save(os.path.join(output, item["image"]))
        Image.fromarray(label).save(os.path.join(output, item["label"]))
        items.append(item)
    logger.info("%s: %d images written to %s (crop %s, %d px)", domain, len(items), output, crop, int(size))
    return items


def update_datalist(output: str, entries: Mapping[str, list[dict]]) -> str:
    """Merge ``entries`` (domain → items) into ``<output>/datalist.json``: the domains given replace theirs, the
    others are kept.

    Args:
        output: the prepared data set's root.
        entries: the domains just prepared.

    Returns:
        the datalist's path.
    """
    path = os.path.join(output, DATALIST_NAME)
    datalist = {}
    if os.path.isfile(path):
        with open(path) as f:
            try:
                datalist = json.load(f)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path} is not valid JSON ({err}): move it away or fix it") from err
        if not isinstance(datalist, dict):
            raise BadInputError(f"{path} is not a datalist (a JSON object mapping each domain to its items)")
    datalist.update(entries)
    os.makedirs(output, exist_ok=True)
    with open(path, "w") as f:
        json.dump(datalist, f, indent=1)
        f.write("\n")
    return path


def _find_dir(source: str, name: str, inside: str | None = None) -> str | None:
    """The first folder called ``name`` (case-insensitive) at or below ``source`` (breadth first, sorted,
    ``SEARCH_DEPTH`` levels), that holds a sub-folder ``inside`` when given."""
    level = [source]
    for _ in range(SEARCH_DEPTH + 1):
        for path in level:
            if os.path.basename(os.path.normpath(path)).lower() == name.lower():
                if inside is None or os.path.isdir(os.path.join(path, inside)):
                    return path
        level = [
            os.path.join(path, entry)
            for path in level
            for entry in sorted(os.listdir(path))
            if not entry.startswith(".") and os.path.isdir(os.path.join(path, entry))
        ]
    return None


def _require_dir(source: str, name: str, expected: str, inside: str | None = None) -> str:
    if not os.path.isdir(source):
        raise MissingInputError(f"--source {source!r} is not a folder")
    found = _find_dir(source, name, inside)
    if found is None:
        folder = f"{name}/{inside}/" if inside else f"{name}/"
        raise BadInputError(f"no {folder} under {source!r}: expected {expected}")
    return found


def _files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files below ``root`` whose names end with one of ``suffixes`` (case-insensitive), sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, n) for n in names if n.lower().endswith(suffixes) and not n.startswith(".")]
    return sorted(found)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _check_found(cases: list[FundusCase], images: int, where: str, expected: str) -> list[FundusCase]:
    if not cases:
        raise BadInputError(
            f"no photograph with its masks in {where!r} ({images} photographs found): expected {expected}"
        )
    return cases


def refuge_cases(source: str, split: str = "train") -> list[FundusCase]:
    """The REFUGE photographs of one split with their masks, as the challenge distributes them unzipped.

    Layout (below ``source``, each archive unzipped with or without a folder of its own name):
    ``Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg`` with ``Annotation-Training400/Disc_Cup_Masks/
    {Glaucoma,Non-Glaucoma}/g0001.bmp``; ``REFUGE-Validation400/V0001.jpg`` with ``REFUGE-Validation400-GT/
    Disc_Cup_Masks/V0001.bmp``; ``Test400/T0001.jpg`` with ``REFUGE-Test-GT/Disc_Cup_Masks/{G,N}/T0001.bmp``.
    A mask is matched to the photograph of the same file name, wherever below ``Disc_Cup_Masks`` it is.

    Args:
        source: the folder the archives were unzipped into.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """
    if split not in REFUGE_SPLITS:
        raise BadInputError(f"unknown REFUGE split {split!r}; choose from {sorted(REFUGE_SPLITS)}")
    _, image_name, mask_name = REFUGE_SPLITS[split]
    expected = (
        f"REFUGE's {split} release unzipped there: {image_name}/.../<id>.jpg (photographs) and "
        f"{mask_name}/Disc_Cup_Masks/.../<id>.bmp (masks)"
    )
    image_dir = _require_dir(source, image_name, expected)
    mask_dir = os.path.join(_require_dir(source, mask_name, expected, inside="Disc_Cup_Masks"), "Disc_Cup_Masks")
    masks = {_stem(p): p for p in _files(mask_dir, (".bmp", ".png"))}
    images = _files(image_dir, (".jpg", ".jpeg", ".png"))
    cases = []
    for image in images:
        if _stem(image) not in masks:
            logger.warning("skipped %s: no mask %s.bmp under %s", image, _stem(image), mask_dir)
            continue
        cases.append(FundusCase(_stem(image), image, (masks[_stem(image)],), refuge_disc_cup))
    return _check_found(cases, len(images), image_dir, expected)


def drishti_cases(source: str, split: str = "train", threshold: float = 0.5) -> list[FundusCase]:
    """The Drishti-GS1 photographs of one split with their soft maps, as the publisher distributes them unpacked.

    Layout (below ``source``): ``Training/Images/drishtiGS_002.png`` with ``Training/GT/drishtiGS_002/SoftMap/
    drishtiGS_002_ODsegSoftmap.png`` and ``..._cupsegSoftmap.png``; ``Test/Images/drishtiGS_001.png`` with
    ``Test/Test_GT/drishtiGS_001/SoftMap/...`` (the test ground truth, released later; ``Test/GT`` is accepted too).

    Args:
        source: the unpacked ``Drishti-GS1_files`` folder (or a folder above it).
        split: ``"train"`` or ``"test"``.
        threshold: the least share of the experts that makes a pixel disc or cup (see :func:`softmap_disc_cup`).
    """
    if split not in DRISHTI_SPLITS:
        raise BadInputError(f"unknown Drishti-GS1 split {split!r}; choose from {sorted(DRISHTI_SPLITS)}")
    _check_threshold(threshold)
    folder, gt_names = DRISHTI_SPLITS[split]
    expected = (
        f"Drishti-GS1's release unpacked there: {folder}/Images/drishtiGS_NNN.png and "
        f"{folder}/{gt_names[0]}/drishtiGS_NNN/SoftMap/drishtiGS_NNN_ODsegSoftmap.png, ..._cupsegSoftmap.png"
    )
    root = _require_dir(source, folder, expected, inside="Images")
    gt_dir = next((os.path.join(root, g) for g in gt_names if os.path.isdir(os.path.join(root, g))), None)
    if gt_dir is None:
        raise BadInputError(f"no {' or '.join(gt_names)}/ in {root!r}: expected {expected}")
    images = _files(os.path.join(root, "Images"), (".png",))
    cases = []
    for image in images:
        case = _stem(image)
        maps = tuple(os.path.join(gt_dir, case, "SoftMap", f"{case}_{k}segSoftmap.png") for k in ("OD", "cup"))
        missing = [m for m in maps if not os.path.isfile(m)]
        if missing:
            logger.warning("skipped %s: no soft map %s", image, missing[0])
            continue
        cases.append(FundusCase(case, image, maps, lambda d, c: softmap_disc_cup(d, c, threshold)))
    return _check_found(cases, len(images), root, expected)


def _rimone_masks(mask_dir: str) -> dict[str, dict[str, str]]:
    """``{case: {"disc": path, "cup": path}}`` from ``<case>-<rater>-{Disc,Cup}-T.png``, the lowest rater first."""
    masks: dict[str, dict[str, str]] = {}
    for path in sorted(_files(mask_dir, (".png",)), key=lambda p: os.path.basename(p).lower()):
        match = RIMONE_MASK.match(os.path.basename(path))
        if match:
            masks.setdefault(match["case"], {}).setdefault(match["kind"].lower(), path)
    return masks


def rimone_cases(source: str, split: str = "train", partition: str = "by_hospital") -> list[FundusCase]:
    """The RIM-ONE DL photographs of one split with their reference segmentations, as distributed unzipped.

    Layout (below ``source``): ``RIM-ONE_DL_images/partitioned_by_hospital/{training_set,test_set}/
    {glaucoma,normal}/r1_Im001.png`` (or ``partitioned_randomly/...``) with ``RIM-ONE_DL_reference_segmentations/
    {glaucoma,normal}/r1_Im001-1-Disc-T.png`` and ``r1_Im001-1-Cup-T.png``.

    Args:
        source: the folder both archives were unzipped into.
        split: ``"train"`` or ``"test"``.
        partition: ``"by_hospital"`` (training: Hospital Universitario de Canarias; test: the two other hospitals)
            or ``"randomly"``.
    """
    if split not in RIMONE_SPLITS:
        raise BadInputError(f"unknown RIM-ONE DL split {split!r}; choose from {sorted(RIMONE_SPLITS)}")
    if partition not in RIMONE_PARTITIONS:
        raise BadInputError(f"unknown RIM-ONE DL partition {partition!r}; choose from {sorted(RIMONE_PARTITIONS)}")
    part = RIMONE_PARTITIONS[partition]
    expected = (
        f"RIM-ONE DL's two archives unzipped there: RIM-ONE_DL_images/{part}/{RIMONE_SPLITS[split]}/"
        "{glaucoma,normal}/<case>.png and RIM-ONE_DL_reference_segmentations/{glaucoma,normal}/<case>-1-Disc-T.png, "
        "<case>-1-Cup-T.png"
    )
    image_dir = os.path.join(_require_dir(source, part, expected, inside=RIMONE_SPLITS[split]), RIMONE_SPLITS[split])
    masks = _rimone_masks(_require_dir(source, "RIM-ONE_DL_reference_segmentations", expected))
    images = _files(image_dir, (".png", ".jpg"))
    cases = []
    for image in images:
        found = masks.get(_stem(image), {})
        if "disc" not in found or "cup" not in found:
            logger.warning("skipped %s: no %s-1-Disc-T.png and -Cup-T.png pair", image, _stem(image))
            continue
        cases.append(FundusCase(_stem(image), image, (found["disc"], found["cup"]), binary_disc_cup))
    return _check_found(cases, len(images), image_dir, expected)


def _domains(splits: Sequence[str], domain: str | None, default: Callable[[str], str]) -> dict[str, str]:
    splits = list(dict.fromkeys(splits))
    if domain is not None and len(splits) > 1:
        raise BadInputError(
            f"--domain {domain!r} names one domain, but {len(splits)} splits were asked for: prepare them one at "
            "a time or leave out --domain"
        )
    return {split: domain or default(split) for split in splits}


def prepare_refuge(
    source: str,
    output: str,
    splits: Sequence[str] = ("train",),
    domain: str | None = None,
    size: int = 256,
    crop: str | CropSize = "512",
) -> dict[str, list[dict]]:
    """Prepare REFUGE splits (see :func:`refuge_cases`) into ``output``, one domain per split.

    Args:
        source: the folder REFUGE's archives were unzipped into.
        output: the prepared data set's root; its ``datalist.json`` is updated.
        splits: any of ``"train"``, ``"val"``, ``"test"``.
        domain: the domain name for a single split (default ``refuge_train``, ``refuge_val``, ``refuge_test``).
        size: the side of the written images.
        crop: the crop side (default 512 pixels of the photograph).

    Returns:
        ``{domain: [{"image", "label"}, ...]}`` as written into the datalist.
    """
    domains = _domains(splits, domain, lambda s: REFUGE_SPLITS.get(s, (f"refuge_{s}",))[0])
    cases = {split: refuge_cases(source, split) for split in domains}  # check every split before writing
    entries = {d: prepare_fundus(cases[s], output, d, size, crop) for s, d in domains.items()}
    update_datalist(output, entries)
    return entries


def prepare_drishti(
    source: str,
    output: str,
    splits: Sequence[str] = ("all",),
    domain: str | None = None,
    size: int = 256,
    crop: str | CropSize = "512",
    threshold: float = 0.5,
) -> dict[str, list[dict]]:
    """Prepare Drishti-GS1 (see :func:`drishti_cases`) into ``output``.

    Args:
        source: the unpacked ``Drishti-GS1_files`` folder (or one above it).
        output: the prepared data set's root; its ``datalist.json`` is updated.
        splits: ``"all"`` (training and test images in one domain, default ``drishti_gs``), or ``"train"`` /
            ``"test"`` (domains ``drishti_gs_train`` / ``drishti_gs_test``).
        domain: the domain name for a single split.
        size: the side of the written images.
        crop: the crop side (default 512 pixels of the photograph).
        threshold: the least share of the experts that makes a pixel disc or cup.

    Returns:
        ``{domain: [{"image", "label"}, ...]}`` as written into the datalist.
    """
    domains = _domains(splits, domain, lambda s: "drishti_gs" if s == "all" else f"drishti_gs_{s}")
    parts = {s: list(DRISHTI_SPLITS) if s == "all" else [s] for s in domains}
    cases = {s: [c for p in parts[s] for c in drishti_cases(source, p, threshold)] for s in domains}
    entries = {d: prepare_fundus(cases[s], output, d, size, crop) for s, d in domains.items()}
    update_datalist(output, entries)
    return entries


def prepare_rimone(
    source: str,
    output: str,
    splits: Sequence[str] = ("all",),
    domain: str | None = None,
    size: int = 256,
    crop: str | CropSize = "1.6x",
    partition: str = "by_hospital",
) -> dict[str, list[dict]]:
    """Prepare RIM-ONE DL (see :func:`rimone_cases`) into ``output``.

    Args:
        source: the folder RIM-ONE DL's image and segmentation archives were unzipped into.
        output: the prepared data set's root; its ``datalist.json`` is updated.
        splits: ``"all"`` (all 485 photographs in one domain, default ``rimone_dl``), or ``"train"`` / ``"test"``
            (domains ``rimone_dl_train`` / ``rimone_dl_test``).
        domain: the domain name for a single split.
        size: the side of the written images.
        crop: the crop side (default 1.6 times the disc diameter: the photographs are already cropped around it).
        partition: which of the publisher's partitions defines the splits: ``"by_hospital"`` or ``"randomly"``.

    Returns:
        ``{domain: [{"image", "label"}, ...]}`` as written into the datalist.
    """
    domains = _domains(splits, domain, lambda s: "rimone_dl" if s == "all" else f"rimone_dl_{s}")
    parts = {s: list(RIMONE_SPLITS) if s == "all" else [s] for s in domains}
    cases = {s: [c for p in parts[s] for c in rimone_cases(source, p, partition)] for s in domains}
    entries = {d: prepare_fundus(cases[s], output, d, size, crop) for s, d in domains.items()}
    update_datalist(output, entries)
    return entries


def _check_nifti(path: str) -> tuple[int, ...]:
    """The shape of a NIfTI file, or a clear error when it is not one (e.g. a git-annex or LFS pointer)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if path.endswith(".gz") and head != b"\x1f\x8b":
        raise BadInputError(
            f"{path!r} is not a gzipped NIfTI file: if the data set was cloned with git, fetch the volumes' "
            "contents (git-annex or git-lfs pointers are text files)"
        )
    try:
        return tuple(nib.load(path).shape)
    except (OSError, EOFError, ImageFileError) as err:  # gzip.BadGzipFile is an OSError
        raise BadInputError(f"{path!r} cannot be read as NIfTI ({err})") from err


def gmchallenge_subjects(source: str) -> list[dict[str, str]]:
    """The manually segmented volumes of the Spinal Cord Gray Matter Imaging Challenge data (BIDS).

    Layout: ``sub-XXXX/anat/sub-XXXX_run-1_T2starw.nii.gz`` with ``derivatives/labels/sub-XXXX/anat/
    sub-XXXX_run-1_T2starw_seg-manual.nii.gz`` (spinal cord) and ``..._gmseg-manual.nii.gz`` (gray matter).
    Subjects without both masks, or with masks off the image's grid, are skipped with a warning.

    Args:
        source: a copy of ``sct-pipeline/gm-challenge-data``.

    Returns:
        ``[{"subject", "image", "label_cord", "label_gm"}, ...]`` (absolute paths), sorted by subject.
    """
    expected = (
        "the BIDS layout of sct-pipeline/gm-challenge-data: sub-XXXX/anat/sub-XXXX_run-1_T2starw.nii.gz and "
        "derivatives/labels/sub-XXXX/anat/sub-XXXX_run-1_T2starw_seg-manual.nii.gz, ..._gmseg-manual.nii.gz"
    )
    if not os.path.isdir(source):
        raise MissingInputError(f"--source {source!r} is not a folder")
    labels = os.path.join(source, "derivatives", "labels")
    if not os.path.isdir(labels):
        raise BadInputError(f"no derivatives/labels/ in {source!r}: expected {expected}")
    found = []
    for subject in sorted(d for d in os.listdir(source) if d.startswith("sub-")):
        stem = f"{subject}_run-1_T2starw"
        item = {
            "subject": subject,
            "image": os.path.join(source, subject, "anat", f"{stem}.nii.gz"),
            "label_cord": os.path.join(labels, subject, "anat", f"{stem}_seg-manual.nii.gz"),
            "label_gm": os.path.join(labels, subject, "anat", f"{stem}_gmseg-manual.nii.gz"),
        }
        missing = [item[k] for k in ("image", "label_cord", "label_gm") if not os.path.isfile(item[k])]
        if missing:
            logger.warning("skipped %s: no %s", subject, os.path.relpath(missing[0], source))
            continue
        shapes = {k: _check_nifti(item[k])[:3] for k in ("image", "label_cord", "label_gm")}
        if len(set(shapes.values())) > 1:
            logger.warning("skipped %s: image and masks differ in shape %s", subject, shapes)
            continue
        found.append(item)
    if not found:
        raise BadInputError(f"no manually segmented volume in {source!r}: expected {expected}")
    return found


def prepare_gmchallenge(
    source: str,
    output: str,
    sites: Mapping[str, str] | None = None,
    domain: str | None = None,
) -> dict[str, list[dict]]:
    """Copy the manually segmented volumes of the gray matter challenge data (see :func:`gmchallenge_subjects`)
    into ``output``, one domain per site.

    Args:
        source: a copy of ``sct-pipeline/gm-challenge-data``.
        output: the prepared data set's root; its ``datalist.json`` is updated.
        sites: subject → site, added to (and overriding) :data:`GMCHALLENGE_SITES`. Subjects with no site are
            skipped with a warning.
        domain: put every subject in this one domain instead.

    Returns:
        ``{site: [{"image", "label_gm", "label_cord"}, ...]}`` as written into the datalist.
    """
    site_of = {**GMCHALLENGE_SITES, **(sites or {})}
    entries: dict[str, list[dict]] = {}
    for subject in gmchallenge_subjects(source):
        name = subject["subject"]
        site = domain or site_of.get(name)
        if site is None:
            logger.warning("skipped %s: no site known for it; pass --site %s=NAME or --domain NAME", name, name)
            continue
        files = {"image": f"images/{name}_T2starw.nii.gz", "label_gm": f"labels/{name}_gm.nii.gz",
                 "label_cord": f"labels/{name}_cord.nii.gz"}  # fmt: skip
        item = {key: f"{site}/{path}" for key, path in files.items()}
        for key, path in item.items():
            os.makedirs(os.path.dirname(os.path.join(output, path)), exist_ok=True)
            shutil.copyfile(subject[key], os.path.join(output, path))
        entries.setdefault(site, []).append(item)
    if not entries:
        raise BadInputError(f"no subject of {source!r} has a site: pass --site SUBJECT=NAME or --domain NAME")
    for site, items in entries.items():
        logger.info("%s: %d volumes written to %s", site, len(items), output)
    update_datalist(output, entries)
    return entries


def _site_pairs(pairs: Iterable[str]) -> dict[str, str]:
    sites = {}
    for pair in pairs:
        subject, sep, site = pair.partition("=")
        if not sep or not subject or not site:
            raise BadInputError(f"--site {pair!r} is not SUBJECT=NAME (e.g. sub-9605=montreal)")
        sites[subject] = site
    return sites


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per data set."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_grata.data.prepare",
        description="Prepare a public data set, as its publisher distributes it, in the layout the bundles read "
        "(<output>/<domain>/images|labels, <output>/datalist.json). See docs/data.md.",
    )
    commands = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--source", required=True, help="the folder the data set was unpacked (or cloned) into")
        sub.add_argument("--output", required=True, help="the prepared data set's root (datalist.json is merged)")
        sub.add_argument("--domain", default=None, help="the domain (folder and datalist key) to write to")
        return sub

    def fundus(name: str, help_text: str, splits: list[str], default_split: str, crop: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument("--split", nargs="+", choices=splits, default=[default_split], help="one domain per split")
        sub.add_argument("--size", type=int, default=256, help="side of the written images (default 256)")
        sub.add_argument("--crop", default=crop, help=f"crop side: pixels (512) or times the disc diameter (1.6x); "
                         f"default {crop}")  # fmt: skip
        return sub

    fundus("refuge", "REFUGE (training, validation, test releases)", list(REFUGE_SPLITS), "train", "512")
    drishti = fundus("drishti", "Drishti-GS1 (training and test images)", ["all", *DRISHTI_SPLITS], "all", "512")
    drishti.add_argument("--softmap_threshold", type=float, default=0.5,
                         help="least share of the experts that makes a pixel disc or cup (default 0.5)")  # fmt: skip
    rimone = fundus("rimone", "RIM-ONE DL (images and reference segmentations)", ["all", *RIMONE_SPLITS], "all", "1.6x")
    rimone.add_argument("--partition", choices=list(RIMONE_PARTITIONS), default="by_hospital")
    gm = command("gmchallenge", "Spinal Cord Gray Matter Imaging Challenge data (sct-pipeline/gm-challenge-data)")
    gm.add_argument("--site", nargs="*", default=[], metavar="SUBJECT=NAME", help="the site of a subject")
    return parser


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Prepare the data set ``args`` name (as parsed by :func:`build_parser`)."""
    if args.dataset == "gmchallenge":
        return prepare_gmchallenge(args.source, args.output, _site_pairs(args.site), args.domain)
    common = {"splits": args.split, "domain": args.domain, "size": args.size, "crop": args.crop}
    if args.dataset == "refuge":
        return prepare_refuge(args.source, args.output, **common)
    if args.dataset == "drishti":
        return prepare_drishti(args.source, args.output, threshold=args.softmap_threshold, **common)
    return prepare_rimone(args.source, args.output, partition=args.partition, **common)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """The command-line entry point: problems with the data or the options end in one ``error:`` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        entries = run(args)
    except BadInputError as err:
        parser.error(str(err))
    for domain, items in entries.items():
        print(f"{domain}: {len(items)} items in {os.path.join(args.output, DATALIST_NAME)}")
    return entries


if __name__ == "__main__":
    main()
