"""The main jobs' per-image Dice on the shipped samples, pinned before a refactoring so that only the code moves.

Each case runs a bundle's ``inference.json`` as a user does (the fundus cases on three images of each target domain
of the sample, to keep them cheap) and compares every image's Dice with
``tests/goldens/main_job.json`` to 1e-4. A change that is meant to move a result (a bug fix) re-records the goldens
with ``python -m tests.test_goldens [case ...]`` from the repository root and says why in its commit.
"""

import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT
from .test_bundle import assert_ok

pytestmark = pytest.mark.slow  # each case runs `python -m monai.bundle` in a subprocess

GOLDENS = os.path.join(REPO_ROOT, "tests", "goldens", "main_job.json")
#: three images of each fundus target domain of the sample (the main job's source is refuge_train)
FUNDUS_DATALIST = os.path.join(REPO_ROOT, "tests", "goldens", "fundus_datalist.json")
FUNDUS = os.path.join(REPO_ROOT, "bundles", "grata", "configs")
SPINALCORD = os.path.join(REPO_ROOT, "bundles", "spinalcord_gm", "configs")
CASES = {
    **{
        f"grata:{m}": (FUNDUS, {"method": m, "datalist": FUNDUS_DATALIST})
        for m in (
            "none", "default", "stem_statistics", "grata_calibrated", "paper", "source_prior", "tent", "dua", "diga",
            "sar",
        )
    },  # fmt: skip
    "spinalcord_gm:default": (SPINALCORD, {}),
    "spinalcord_gm:stem_statistics": (SPINALCORD, {"method": "stem_statistics"}),
    "spinalcord_gm:grata_calibrated": (SPINALCORD, {"method": "grata_calibrated"}),
}
TOLERANCE = 1e-4
#: the jobs' CPU threads, as when the goldens were recorded: reductions summed in another order move DUA's running
#: statistics over its 64 copies enough to flip a few pixels (1.6e-4 cup Dice on one image with one thread)
THREADS = 2


def run_case(case: str, output_dir: str) -> dict:
    """Runs one case's main job into ``output_dir`` and returns its per-image Dice and mask digests.

    Args:
        case: a key of ``CASES``.
        output_dir: where the job writes its masks and reports.
    """
    config_dir, overrides = CASES[case]
    options = {"output_dir": output_dir, "overlays": False, "device": "cpu", **overrides}
    args = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(config_dir, "inference.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    assert_ok(subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800))
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
