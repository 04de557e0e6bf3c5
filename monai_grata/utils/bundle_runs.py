"""Run a bundle config once per output folder and read its ``metrics.json`` (for result scripts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

__all__ = ["run_bundle_once"]


def run_bundle_once(config_file: str, output_dir: str, **overrides) -> dict:
    """Run ``python -m monai.bundle run --config_file CONFIG --output_dir DIR --key value ...`` unless
    ``DIR/metrics.json`` already exists (so a long series of runs can be stopped and resumed); return that file.

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
        with open(os.path.join(output_dir, "run.log"), "w") as log:
            subprocess.run([*command, *args], check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(metrics_path) as f:
        return json.load(f)
