"""Split what the benchmark needs on the GPU machine into folders that each fit one call of the device tool.

    python benchmarks/device_stage.py --dataset_dir ../shared/data/fundus      # writes .device_stage/part1 ... partN

The device tool copies the working tree plus the carried paths, at most 64 MiB per call; the wheels
(`benchmarks/make_wheelhouse.sh`), the three source models and their denoisers and the fundus data come to about
260 MB. This script hard-links them into ``.device_stage/part<k>/`` (``wheelhouse/``, ``models/``, ``fundus/``, the
dataset's relative layout kept), each part under the limit less the working tree's own size, and prints one
line per part. On the machine each call copies its part into one folder that outlives the call while the
machine stays warm (``cp -r .device_stage/partK/. /root/stage/``, carrying ``.device_stage/partK``); the first
call installs the wheels (``WHEELHOUSE=/root/stage/wheelhouse bash benchmarks/gpu_check.sh``), the last runs the
benchmark with ``--dataset_dir /root/stage/fundus --models_dir /root/stage/models`` (``docs/results.md``).
``.device_stage/`` is added to ``.git/info/exclude``: it never enters the repository. The shipped models must be
untracked during the calls (``docs/performance.md`` has the two lines), so their size is not counted in the tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess

LIMIT = 64 * 2**20
MARGIN = 1_000_000  # folder entries, and files the working tree gains before the call


def working_tree_bytes(models_dir: str) -> int:
    """Bytes of the files the device tool sends anyway: tracked, and untracked but not ignored — less the
    ``.pt`` files of ``models_dir``, which must be untracked for the calls (``docs/performance.md``)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], capture_output=True, check=True
    ).stdout.decode()
    models = os.path.normpath(models_dir) + os.sep
    paths = [p for p in listed.split("\0") if p and os.path.isfile(p)]
    return sum(os.path.getsize(p) for p in paths if not (p.startswith(models) and p.endswith(".pt")))


def payload(wheelhouse: str, models_dir: str, dataset_dir: str, sources: list[str]) -> list[tuple[str, str]]:
    """(file, destination inside a part) for every file to send: wheels, models and denoisers, then the data.

    Args:
        wheelhouse: folder of wheels.
        models_dir: folder with ``source_<name>.pt`` and ``denoiser_<name>.pt``.
        dataset_dir: the dataset folder (``datalist.json`` and the domains' files).
        sources: the source names whose models travel.
    """
    files = [(os.path.join(wheelhouse, f), f"wheelhouse/{f}") for f in sorted(os.listdir(wheelhouse))]
    for source in sources:
        for kind in ("source", "denoiser"):
            path = os.path.join(models_dir, f"{kind}_{source}.pt")
            if os.path.isfile(path):
                files.append((path, f"models/{kind}_{source}.pt"))
    for root, dirs, names in os.walk(dataset_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            files.append((path, "fundus/" + os.path.relpath(path, dataset_dir)))
    return files


def split(files: list[tuple[str, str]], capacity: int) -> list[list[tuple[str, str]]]:
    """Fill parts in order, first fit: a file that does not fit the last part opens a new one.

    Raises:
        ValueError: a single file larger than ``capacity``.
    """
    parts: list[list[tuple[str, str]]] = []
    sizes: list[int] = []
    for item in files:
        size = os.path.getsize(item[0])
        if size > capacity:
            raise ValueError(f"{item[0]} ({size} bytes) alone exceeds one call's room ({capacity} bytes)")
        for k, used in enumerate(sizes):
            if used + size <= capacity:
                parts[k].append(item)
                sizes[k] += size
                break
        else:
            parts.append([item])
            sizes.append(size)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models_dir", default="bundles/grata/models")
    parser.add_argument("--wheelhouse", default=".wheelhouse")
    parser.add_argument("--sources", nargs="+", default=["drishti_gs", "refuge_train", "refuge_val"])
    parser.add_argument("--out", default=".device_stage")
    args = parser.parse_args()
    capacity = LIMIT - working_tree_bytes(args.models_dir) - MARGIN
    parts = split(payload(args.wheelhouse, args.models_dir, args.dataset_dir, args.sources), capacity)
    shutil.rmtree(args.out, ignore_errors=True)
    for k, items in enumerate(parts, start=1):
        for source, dest in items:
            target = os.path.join(args.out, f"part{k}", dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copyfile(source, target)
        print(f"{args.out}/part{k}: {len(items)} files, {sum(os.path.getsize(s) for s, _ in items)} bytes")
    exclude = os.path.join(".git", "info", "exclude")
    line = f"/{args.out.strip('/')}/"
    if os.path.isdir(os.path.dirname(exclude)):
        with open(exclude, "a+") as f:
            f.seek(0)
            if line not in f.read().splitlines():
                f.write(line + "\n")


if __name__ == "__main__":
    main()
