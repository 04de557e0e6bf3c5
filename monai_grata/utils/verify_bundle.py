"""Check a bundle the way MONAI's model zoo does before it accepts one, without the network.

python -m monai_grata.utils.verify_bundle bundles/grata bundles/spinalcord_gm

The model zoo's ``ci/verify_bundle.py`` (Project-MONAI/model-zoo) in its ``min`` mode downloads the files listed in
``large_files.yml`` (checking each one's hash), requires ``LICENSE`` and ``configs/metadata.json``, prefers
``models/model.pt`` and ``configs/inference.json``, requires ``version`` and ``changelog`` with the version a key of
the changelog, and validates the metadata against the schema its ``schema`` field names. This module runs the same
checks offline:

- the large files are not downloaded: each listed file must already be in the bundle with the listed hash (the
  zoo's ``download_url`` checks an existing file's hash the same way and skips the download);
- the schema is the bundle's own copy, ``docs/metadata_schema.json`` (MONAI's ``verify_metadata`` reads it instead
  of downloading when the file exists);
- the preferred weights are ``models/model.pt`` or, for a bundle whose configs load other names (the zoo exempts
  such bundles through its ``exclude_verify_preferred_files_list``), the checkpoint ``configs/inference.json``
  loads by default (its ``ckpt_path``);
- the zoo's check that the version is new (against its ``models/model_info.json``) needs the zoo itself and is
  left out.

It adds the rules this repository keeps for its bundles: every ``models/*.pt`` and every file over the zoo's 25 MB
limit is listed in ``large_files.yml`` with a hash (``hash_val`` and ``hash_type`` are optional in the zoo; a file
without a hash is not checked at all), the version is the newest in the changelog, no metadata text points at a
relative path outside the bundle, ``docs/README.md`` has the sections of the zoo's bundle READMEs, and a
``configs/inference.json`` that runs this package's main job takes exactly the package's command-line options
(:data:`monai_grata.engines.JOB_OPTIONS`, their one list).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "README_SECTIONS",
    "BundleCheckError",
    "check_large_files",
    "check_metadata_schema",
    "check_readme",
    "check_required_files",
    "check_version",
    "check_weights",
    "file_hash",
    "main",
    "read_large_files",
    "verify_bundle",
]

REQUIRED_FILES = ("configs/metadata.json", "LICENSE")
"""Files the model zoo requires in every bundle (its ``necessary_files_list``)."""

SCHEMA_FILE = "docs/metadata_schema.json"
"""The bundle's copy of the metadata schema, read instead of downloading the one ``metadata.json`` names."""

LARGE_FILES_NAMES = ("large_files.yml", "large_files.yaml", "large_files.json")
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
"""The hash types the model zoo's ``large_files.yml`` supports."""

MAX_FILE_MB = 25
"""The model zoo stores no single file larger than this in a bundle; larger ones go through ``large_files.yml``."""

README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "References",
    "License",
)
"""The headings of the model zoo's bundle READMEs (e.g. ``spleen_ct_segmentation``) that ``docs/README.md`` needs."""


class BundleCheckError(ValueError):
    """A bundle failed one or more checks.

    Args:
        bundle: the bundle folder.
        problems: one message per failed check.
    """

    def __init__(self, bundle: str, problems: Sequence[str]) -> None:
        self.bundle = bundle
        self.problems = list(problems)
        super().__init__(f"{bundle}: {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_metadata(bundle: str) -> dict:
    """``configs/metadata.json`` as a dict; raises :class:`BundleCheckError` when it is missing or not a JSON object."""
    path = os.path.join(bundle, "configs", "metadata.json")
    try:
        metadata = _read_json(path)
    except FileNotFoundError as e:
        raise BundleCheckError(bundle, ["necessary file configs/metadata.json is missing"]) from e
    except json.JSONDecodeError as e:
        raise BundleCheckError(bundle, [f"configs/metadata.json is not valid JSON: {e}"]) from e
    if not isinstance(metadata, dict):
        raise BundleCheckError(bundle, ["configs/metadata.json is not a JSON object"])
    return metadata


def check_required_files(bundle: str) -> list[str]:
    """The files the model zoo requires (``LICENSE``, ``configs/metadata.json``) and ``configs/inference.*``.

    Args:
        bundle: the bundle folder.

    Returns:
        one message per missing file (empty when all are there).
    """
    problems = [f"necessary file {name} is missing" for name in REQUIRED_FILES if not os.path.isfile(_at(bundle, name))]
    if not any(os.path.isfile(os.path.join(bundle, "configs", f"inference.{ext}")) for ext in ("json", "yaml", "yml")):
        problems.append("inference config file is missing (configs/inference.json, .yaml or .yml)")
    return problems


def _version_key(version: str) -> tuple[int, ...] | None:
    """``"0.2.10"`` -> ``(0, 2, 10)``; ``None`` for anything but dot-separated integers."""
    return tuple(int(part) for part in version.split(".")) if re.fullmatch(r"\d+(\.\d+)*", version) else None


def check_version(metadata: dict) -> list[str]:
    """``version`` and ``changelog`` are there, the version is a key of the changelog and the newest one.

    Args:
        metadata: the content of ``configs/metadata.json``.

    Returns:
        one message per problem.
    """
    version, changelog = metadata.get("version"), metadata.get("changelog")
    problems = []
    if not isinstance(version, str) or not version:
        problems.append("'version' is missing in configs/metadata.json")
    if not isinstance(changelog, dict) or not changelog:
        problems.append("'changelog' is missing in configs/metadata.json (a dict: version -> what changed)")
    if problems:
        return problems
    if version not in changelog:
        return [f"version {version} is missing in 'changelog' of configs/metadata.json (it has {sorted(changelog)})"]
    keys = {key: _version_key(key) for key in changelog}
    unparsed = sorted(key for key, parsed in keys.items() if parsed is None)
    if unparsed:
        return [f"changelog keys {unparsed} are not versions like 0.2.0"]
    newest = max(keys, key=lambda key: keys[key])
    if newest != version:
        problems.append(f"version {version} is not the newest in 'changelog' ({newest} is)")
    return problems


def _relative_paths_outside(value: Any, key: str) -> Iterator[str]:
    """The metadata fields (dotted keys) whose text holds a relative path leaving the bundle (``../``)."""
    if isinstance(value, str) and re.search(r"(^|[\s\"'(`])\.\.[/\\]", value):
        yield key
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _relative_paths_outside(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _relative_paths_outside(v, f"{key}[{i}]")


@contextmanager
def _quiet_verify_metadata() -> Iterator[None]:
    """MONAI's ``verify_metadata`` logs its arguments at INFO and warns that the schema file has no hash to check
    (it is the bundle's own copy, not a download): keep the check's output to its result."""
    loggers = [logging.getLogger(name) for name in ("monai.bundle", "monai.bundle.scripts", "monai.apps")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No hash value provided", category=UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_metadata_schema(bundle: str, metadata: dict) -> list[str]:
    """``configs/metadata.json`` is valid against the bundle's schema copy (MONAI's ``verify_metadata``, offline).

    Args:
        bundle: the bundle folder.
        metadata: the content of its ``configs/metadata.json``.

    Returns:
        one message per problem.
    """
    from monai.bundle import verify_metadata

    problems = [
        f"metadata field '{key}' points at a relative path outside the bundle ('../'): name the public data set or "
        "the document instead"
        for key in _relative_paths_outside(metadata, "")
    ]
    schema = _at(bundle, SCHEMA_FILE)
    if not os.path.isfile(schema):
        return problems + [f"{SCHEMA_FILE} is missing: the offline check validates the metadata against this copy"]
    try:
        with _quiet_verify_metadata():
            verify_metadata(meta_file=_at(bundle, "configs/metadata.json"), filepath=schema)
    except ValueError as e:
        problems.append(f"configs/metadata.json is not valid against {SCHEMA_FILE}: {e}")
    return problems


def read_large_files(bundle: str) -> list[dict]:
    """The entries of the bundle's ``large_files.yml`` (or ``.yaml``, ``.json``), as the model zoo reads them.

    Args:
        bundle: the bundle folder.

    Returns:
        the list under ``large_files`` (empty when the bundle has no such file).

    Raises:
        BundleCheckError: two such files, or one that is not a mapping with a ``large_files`` list of mappings.
    """
    from monai.bundle import ConfigParser

    found = [name for name in LARGE_FILES_NAMES if os.path.isfile(os.path.join(bundle, name))]
    if not found:
        return []
    if len(found) > 1:
        raise BundleCheckError(bundle, [f"more than one large files list: {found}"])
    try:
        content = ConfigParser.load_config_file(os.path.join(bundle, found[0]))
    except Exception as e:  # any parse error of the list is reported as the bundle's problem
        raise BundleCheckError(bundle, [f"{found[0]} cannot be read: {e}"]) from e
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise BundleCheckError(bundle, [f"{found[0]} needs a 'large_files' list of entries (path, url, hash_val, ...)"])
    return entries


def file_hash(path: str, hash_type: str = "sha256") -> str:
    """The hex digest of a file, read in chunks.

    Args:
        path: the file.
        hash_type: one of :data:`HASH_TYPES`.
    """
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_large_file_entry(bundle: str, entry: dict) -> list[str]:
    """One ``large_files`` entry: its fields, and the listed file's hash."""
    path, url = entry.get("path"), entry.get("url")
    hash_val, hash_type = entry.get("hash_val"), entry.get("hash_type")
    if not isinstance(path, str) or not path:
        return [f"large_files entry {entry} has no 'path'"]
    if os.path.isabs(path) or os.path.normpath(path).startswith(".."):
        return [f"large file {path}: 'path' must be relative to the bundle and inside it"]
    problems = []
    if not isinstance(url, str) or not url:
        problems.append(f"large file {path}: 'url' is missing (the model zoo downloads the file from it)")
    elif "://" not in url and not url.replace("\\", "/").endswith("/" + path):
        problems.append(f"large file {path}: 'url' {url!r} is neither a download link nor a path ending in {path}")
    if not hash_val or not hash_type:
        return problems + [f"large file {path}: 'hash_val' and 'hash_type' are required (e.g. sha256)"]
    if hash_type not in HASH_TYPES:
        return problems + [f"large file {path}: hash_type {hash_type!r} is not one of {list(HASH_TYPES)}"]
    full = os.path.join(bundle, path)
    if not os.path.isfile(full):
        return problems + [f"large file {path} is listed but not in the bundle (this check downloads nothing)"]
    actual = file_hash(full, hash_type)
    if actual != str(hash_val).lower():
        problems.append(f"large file {path}: {hash_type} is {actual}, large_files.yml says {hash_val}")
    return problems


def check_large_files(bundle: str) -> list[str]:
    """Every ``large_files`` entry is well formed and matches its file; every weight file and large file is listed.

    Args:
        bundle: the bundle folder.

    Returns:
        one message per problem.
    """
    try:
        entries = read_large_files(bundle)
    except BundleCheckError as e:
        return e.problems
    listed = [os.path.normpath(entry["path"]) for entry in entries if isinstance(entry.get("path"), str)]
    problems = [f"large file {path} is listed twice" for path in sorted(set(listed)) if listed.count(path) > 1]
    for entry in entries:
        problems += _check_large_file_entry(bundle, entry)
    weights = {os.path.relpath(p, bundle) for p in glob.glob(os.path.join(bundle, "models", "*.pt"))}
    problems += [f"weight file {path} is not listed in large_files.yml" for path in sorted(weights - set(listed))]
    problems += [
        f"{path} is larger than {MAX_FILE_MB} MB and not listed in large_files.yml"
        for path in sorted(_large_files_on_disk(bundle) - weights - set(listed))
    ]
    return problems


def _large_files_on_disk(bundle: str) -> set[str]:
    """Paths (relative to the bundle) of the files larger than :data:`MAX_FILE_MB`."""
    found = set()
    for root, _dirs, files in os.walk(bundle):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > MAX_FILE_MB * 1024 * 1024:
                found.add(os.path.relpath(path, bundle))
    return found


def _default_checkpoint(bundle: str) -> str | None:
    """The checkpoint ``configs/inference.json`` loads by default (its ``ckpt_path``, with ``bundle_root`` set to
    ``bundle``), relative to the bundle; ``None`` when the config has no ``ckpt_path``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    if "ckpt_path" not in parser.get():
        return None
    parser["bundle_root"] = bundle
    if "imports" in parser.get():
        parser.get_parsed_content("imports")
    return os.path.relpath(str(parser.get_parsed_content("ckpt_path")), bundle)


def check_weights(bundle: str, listed: Sequence[str]) -> list[str]:
    """The model zoo's preferred weights: ``models/model.pt``, or else the checkpoint the inference config loads by
    default; either shipped or listed in ``large_files.yml``.

    Args:
        bundle: the bundle folder.
        listed: the paths ``large_files.yml`` lists.

    Returns:
        one message per problem.
    """
    available = {os.path.normpath(p) for p in listed}
    if os.path.isfile(os.path.join(bundle, "models", "model.pt")) or os.path.normpath("models/model.pt") in available:
        return []
    if not os.path.isfile(os.path.join(bundle, "configs", "inference.json")):
        return ["no models/model.pt, and no configs/inference.json whose ckpt_path would name the weights"]
    try:
        checkpoint = _default_checkpoint(bundle)
    except Exception as e:  # a config that does not resolve is reported, not raised
        return [f"no models/model.pt, and the ckpt_path of configs/inference.json does not resolve: {e}"]
    if checkpoint is None:
        return ["no models/model.pt, and configs/inference.json has no ckpt_path naming the weights it loads"]
    if not os.path.isfile(os.path.join(bundle, checkpoint)) and os.path.normpath(checkpoint) not in available:
        return [f"the weights configs/inference.json loads by default ({checkpoint}) are not in the bundle"]
    return []


def check_readme(bundle: str) -> list[str]:
    """``docs/README.md`` is there with every heading of :data:`README_SECTIONS`.

    Args:
        bundle: the bundle folder.

    Returns:
        one message per problem.
    """
    path = _at(bundle, "docs/README.md")
    if not os.path.isfile(path):
        return ["docs/README.md is missing"]
    with open(path, encoding="utf-8") as f:
        headings = {m.group(1).strip().strip("*").strip().lower() for m in re.finditer(r"^#+\s+(.+)$", f.read(), re.M)}
    missing = [section for section in README_SECTIONS if section.lower() not in headings]
    return [f"docs/README.md lacks the section(s) {missing}"] if missing else []


def check_main_job(bundle: str) -> list[str]:
    """``configs/inference.json``, where it runs this package's main job (it has an ``options`` map), takes the
    package's command-line options (:data:`~monai_grata.engines.JOB_OPTIONS`), no more and no fewer.

    Args:
        bundle: the bundle folder.

    Returns:
        one message per problem.
    """
    path = _at(bundle, "configs/inference.json")
    try:
        config = _read_json(path)
    except (OSError, ValueError):
        return []  # a missing or broken inference.json is check_required_files' to report
    if not isinstance(config, dict) or "options" not in config:
        return []
    from monai_grata.engines import check_job_options  # torch and MONAI's engines only for bundles that need them

    return [f"configs/inference.json: {problem}" for problem in check_job_options(config)]


def _at(bundle: str, relative: str) -> str:
    return os.path.join(bundle, *relative.split("/"))


def verify_bundle(bundle: str) -> list[str]:
    """Run every check on one bundle.

    Args:
        bundle: the bundle folder (e.g. ``bundles/grata``).

    Returns:
        the names of the checks that ran (all passed).

    Raises:
        BundleCheckError: with one message per failed check.
    """
    if not os.path.isdir(bundle):
        raise BundleCheckError(bundle, ["not a folder"])
    problems = check_required_files(bundle)
    try:
        metadata = _read_metadata(bundle)
    except BundleCheckError as e:
        problems += [p for p in e.problems if p not in problems]
    else:
        problems += check_version(metadata)
        problems += check_metadata_schema(bundle, metadata)
    problems += check_large_files(bundle)
    try:
        listed = [entry["path"] for entry in read_large_files(bundle) if isinstance(entry.get("path"), str)]
    except BundleCheckError:
        listed = []  # already reported by check_large_files
    problems += check_weights(bundle, listed)
    problems += check_readme(bundle)
    problems += check_main_job(bundle)
    if problems:
        raise BundleCheckError(bundle, problems)
    checks = ["required files", "version and changelog", "metadata schema", "large files", "weights", "README"]
    return [*checks, "main job"]


def main(argv: Sequence[str] | None = None) -> int:
    """Check each bundle given; print one line per bundle and each problem.

    Args:
        argv: the bundle folders (default: ``sys.argv[1:]``).

    Returns:
        0 when every bundle passes, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description="Check bundles against the MONAI model zoo's offline checks.")
    parser.add_argument("bundles", nargs="+", help="bundle folders, e.g. bundles/grata")
    args = parser.parse_args(argv)
    failed = 0
    for bundle in args.bundles:
        try:
            checks = verify_bundle(bundle)
        except BundleCheckError as e:
            print(e, file=sys.stderr)
            failed += 1
        else:
            print(f"{bundle}: ok ({', '.join(checks)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
