"""The main jobs' per-image Dice on the shipped samples, pinned before a refactoring so that only the code moves.

Each case runs a bundle's ``inference.json`` as a user does (the fundus cases at 128 px, to keep them cheap) and
compares every image's Dice with
``tests/goldens/main_job.json`` to 1e-4. A change that is meant to move a result (a bug fix) re-records the goldens
with ``python -m tests.test_goldens [case ...]`` from the repository root and says why in its commit.
"""

import csv
import hashlib
import json
import os
import sys

import pytest

from .conftest import REPO_ROOT
from .test_bundle import assert_ok, run_config

pytestmark = pytest.mark.slow  # each case runs `python -m monai.bundle` in a subprocess

GOLDENS = os.path.join(REPO_ROOT, "tests", "goldens", "main_job.json")
FUNDUS = os.path.join(REPO_ROOT, "bundles", "grata", "configs")
SPINALCORD = os.path.join(REPO_ROOT, "bundles", "spinalcord_gm", "configs")
CASES = {
    **{
        f"grata:{m}": (FUNDUS, {"method": m, "image_size": 128})
        for m in ("none", "default", "paper", "source_prior", "tent", "dua", "diga", "sar")
    },
    "spinalcord_gm:default": (SPINALCORD, {}),
}
TOLERANCE = 1e-4


def run_case(case: str, output_dir: str) -> dict:
    """Runs one case's main job into ``output_dir`` and returns its per-image Dice and mask digests.

    Args:
        case: a key of ``CASES``.
        output_dir: where the job writes its masks and reports.
    """
    config_dir, overrides = CASES[case]
    assert_ok(run_config("inference.json", config_dir, output_dir=output_dir, overlays=False, **overrides))
    with open(os.path.join(output_dir, "per_image.csv")) as f:
        rows = list(csv.DictReader(f))
    dice = {}
    for row in rows:
        dice[os.path.basename(row["filename"])] = {k: float(v) for k, v in row.items() if k.startswith("dice_")}
    masks_dir = os.path.join(output_dir, "masks")
    masks = {}
    for name in sorted(os.listdir(masks_dir)):
        with open(os.path.join(masks_dir, name), "rb") as f:
            masks[name] = hashlib.sha256(f.read()).hexdigest()[:16]
    return {"dice": dice, "masks": masks}


@pytest.mark.parametrize("case", list(CASES))
def test_main_job_matches_its_golden(case, tmp_path):
    with open(GOLDENS) as f:
        golden = json.load(f)[case]
    got = run_case(case, str(tmp_path / "out"))
    assert set(got["dice"]) == set(golden["dice"])
    moved = {
        f"{image}/{key}": (value, got["dice"][image][key])
        for image, scores in golden["dice"].items()
        for key, value in scores.items()
        if abs(got["dice"][image][key] - value) > TOLERANCE
    }
    assert not moved, f"{case}: Dice moved from its golden (golden, now): {moved}"


def record(cases: list, work_dir: str) -> None:
    """Re-records ``cases`` into the goldens file, keeping the others.

    Args:
        cases: keys of ``CASES``; all of them when empty.
        work_dir: a scratch folder for the jobs' outputs.
    """
    goldens = {}
    if os.path.isfile(GOLDENS):
        with open(GOLDENS) as f:
            goldens = json.load(f)
    for case in cases or list(CASES):
        goldens[case] = run_case(case, os.path.join(work_dir, case.replace(":", "_")))
        print(case, "recorded", flush=True)
    os.makedirs(os.path.dirname(GOLDENS), exist_ok=True)
    with open(GOLDENS, "w") as f:
        json.dump(goldens, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        record(sys.argv[1:], scratch)
