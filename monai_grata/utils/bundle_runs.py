"""Run a bundle config once per output folder and read its ``metrics.json`` (for result scripts)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping

from .files import atomic_write

__all__ = ["run_bundle_once", "write_metrics"]


def write_metrics(path: str, *summaries: Mapping[str, float]) -> dict[str, float | None]:
    """Merge summaries (later ones win) into one JSON file, non-finite values written as ``null``; the file
    is written atomically (complete or not at all).

    Args:
        path: the JSON file to write (its folder is created).
        summaries: dicts of scalar results, e.g. a :class:`~monai_grata.handlers.MetricsReport` summary.

    Returns:
        what was written.
    """
    merged = {k: (v if math.isfinite(v) else None) for s in summaries for k, v in s.items()}
    with atomic_write(path) as f:
        json.dump(merged, f, indent=2)
    return merged


def run_bundle_once(config_file: str, output_dir: str, **overrides) -> dict:
    """Run ``python -m monai.bundle run --config_file CONFIG --output_dir DIR --key value ...`` unless
    ``DIR/metrics.json`` already exists (so a long series of runs can be stopped and resumed); return that file.
    A run made here also leaves its wall-clock seconds in ``DIR/wall_time.json``.

    Args:
        config_file: the bundle config.
        output_dir: the run's output folder.
        overrides: further ``--key value`` overrides.

    Raises:
        subprocess.CalledProcessError: when the run fails (its log is in ``DIR/run.log``).
    """
    metrics_path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(metrics_path):
        os.makedirs(output_dir, exist_ok=True)
        args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
        command = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            config_file,
            "--output_dir",
            output_dir,
        ]
        start = time.perf_counter()
        with open(os.path.join(output_dir, "run.log"), "w") as log:
            subprocess.run([*command, *args], check=True, stdout=log, stderr=subprocess.STDOUT)
        write_metrics(os.path.join(output_dir, "wall_time.json"), {"wall_s": time.perf_counter() - start})
    with open(metrics_path) as f:
        return json.load(f)
