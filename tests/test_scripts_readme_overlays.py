"""``scripts/readme_overlays.py``: the README's figure, the main job's overlays in one row."""

import numpy as np
import pytest
from PIL import Image

from .conftest import load_script


def test_overlays_are_placed_left_to_right_at_the_tile_size(tmp_path):
    script = load_script("readme_overlays")
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (64, 32), colour).save(tmp_path / f"{name}_overlay.png")
    row = np.asarray(script.tile_overlays(str(tmp_path), ["b", "a"], size=16))
    assert row.shape == (16, 32, 3)
    assert (row[:, :16] == (0, 0, 255)).all() and (row[:, 16:] == (255, 0, 0)).all()
    with pytest.raises(FileNotFoundError, match="c_overlay.png: run the main job first"):
        script.tile_overlays(str(tmp_path), ["a", "c"], size=16)
