"""The README's figure (docs/images/main_job_overlays.png): overlays the main job wrote, side by side.

    python -m monai.bundle run --config_file bundles/grata/configs/inference.json
    python scripts/readme_overlays.py

Each overlay is read from the main job's ``overlays/`` folder (``<image>_overlay.png``), resized to ``--size`` and
placed left to right in the order given.
"""

from __future__ import annotations

import argparse
import os

from PIL import Image

#: one sample of each target domain of the main job: drishti_gs, refuge_val
IMAGES = ("gdrishtiGS_001", "V0051")


def tile_overlays(overlay_dir: str, images: list[str], size: int) -> Image.Image:
    """The overlays of ``images`` from ``overlay_dir``, each ``size`` × ``size``, in one row.

    Args:
        overlay_dir: the main job's ``overlays/`` folder.
        images: image names (the file name without ``_overlay.png``).
        size: the side of each tile in pixels.

    Raises:
        FileNotFoundError: an overlay the main job did not write (its path named).
    """
    tiles = []
    for name in images:
        path = os.path.join(overlay_dir, f"{name}_overlay.png")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no overlay {path}: run the main job first (inference.json writes overlays/)")
        tiles.append(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    row = Image.new("RGB", (size * len(tiles), size))
    for i, tile in enumerate(tiles):
        row.paste(tile, (i * size, 0))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay_dir", default="outputs/inference/overlays")
    parser.add_argument("--images", nargs="+", default=list(IMAGES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--output", default="docs/images/main_job_overlays.png")
    args = parser.parse_args()
    tile_overlays(args.overlay_dir, args.images, args.size).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
