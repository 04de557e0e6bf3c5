"""Write the configuration a ``python -m monai.bundle run`` invocation executes, overrides applied."""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
from collections.abc import Sequence

from monai.bundle import ConfigParser

__all__ = ["export_run_config"]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _command_line_overrides(argv: Sequence[str]) -> tuple[list[str], dict]:
    """``--config_file`` and the ``--key value`` overrides of a ``monai.bundle run`` command line."""
    config_files: list[str] = []
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, _, inline = arg[2:].partition("=")
            if inline:
                value, i = inline, i + 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 2
            else:
                value, i = "True", i + 1
            if key == "config_file":
                parsed = _value(value)
                config_files += parsed if isinstance(parsed, list) else [str(parsed)]
            else:
                overrides[key] = _value(value)
        else:
            i += 1
    return config_files, overrides


def export_run_config(path: str, config_file: str | None = None, argv: Sequence[str] | None = None) -> str:
    """Save the bundle config of this run, with the command line's overrides applied, to ``path`` (JSON).

    Args:
        path: the output file.
        config_file: the config file; default: ``--config_file`` of the command line.
        argv: the command line; default ``sys.argv``.

    Returns:
        ``path``. When no config file is given and the command line names none (a bundle run started from
        Python rather than ``python -m monai.bundle``), the file records only the command line, with a warning.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    files, overrides = _command_line_overrides(argv)
    files = [config_file] if config_file is not None else files
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not files:
        logging.getLogger(__name__).warning("no --config_file on the command line: %s records the command only", path)
        with open(path, "w") as f:
            json.dump({"argv": argv}, f, indent=4)
        return path
    parser = ConfigParser()
    parser.read_config(files)
    for key, value in overrides.items():
        if key in ("meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking", "args_file"):
            continue
        parser[key.replace("#", "::")] = value
    ConfigParser.export_config_file(parser.get(), path, fmt="json", indent=4)
    return path
