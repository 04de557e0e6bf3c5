#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu_check.sh installs on a GPU machine with no network.
#
#     bash benchmarks/make_wheelhouse.sh [DEST]        # DEST defaults to .wheelhouse (ignored by git)
#
# Run it where the package is installed (`pip install -e .`) and a package index is reachable. It takes the
# run-time requirements of monai-grata (with monai's fire and jsonschema extras), closes them over their own
# requirements as installed here, leaves out what the GPU machine's image already has (PRESENT below: its own
# CUDA build of torch, numpy, scipy, pandas, matplotlib, ...), and downloads each of the rest, at the version
# installed here, as a wheel for CPython $PYVER (default 3.12, the GPU machine's) on manylinux x86_64. A package
# that publishes no wheel is built into one here (pure Python only). gpu_check.sh installs, with --no-deps,
# only the wheels whose package the machine lacks, so PRESENT only keeps the wheelhouse small.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.wheelhouse}
PYVER=${PYVER:-3.12}
PYTHON=${PYTHON:-python}

# On the GPU machine's image (its package list as read on 2026-11-17), among monai-grata's requirements.
PRESENT="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle
contourpy cycler filelock fonttools frozenlist fsspec h11 idna jinja2 joblib kiwisolver markupsafe matplotlib mpmath
multidict narwhals networkx numpy packaging pandas pillow propcache protobuf pyarrow pyparsing python-dateutil pyyaml
requests scikit-learn scipy setuptools six sympy threadpoolctl torch tqdm typing-extensions urllib3 werkzeug wheel
yarl zipp pytest"

PINS=$(PYVER=$PYVER PRESENT=$PRESENT "$PYTHON" - <<'EOF'
import importlib.metadata as md
import os
import re

from packaging.requirements import Requirement

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

major, minor = os.environ["PYVER"].split(".")[:2]
env = {"python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython"}
present = {norm(n) for n in os.environ["PRESENT"].split()}
versions, done = {}, set()
todo = [("monai-grata", ())]
while todo:
    name, extras = todo.pop()
    if (norm(name), tuple(sorted(extras))) in done:
        continue
    done.add((norm(name), tuple(sorted(extras))))
    dist = md.distribution(name)  # raises if a requirement is not installed here
    versions[norm(name)] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            todo.append((req.name, tuple(req.extras)))
for name in sorted(versions):
    if name not in present and name != "monai-grata":
        print(f"{name}=={versions[name]}")
EOF
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each package: two would stop the install there
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pin in $PINS; do
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
            "${PLATFORMS[@]}" -d "$DEST" "$pin" 2>/dev/null; then
        echo "no wheel of $pin for CPython $PYVER: building one (pure Python only)"
        "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$pin"
    fi
done
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST:"
echo "$PINS" | tr '\n' ' '
echo
