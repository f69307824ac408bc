#!/usr/bin/env bash
# The Python package as a user installs it: `python3 -m pip install .` into a fresh virtual
# environment with pip's defaults (build isolation: scikit-build-core and pybind11 come from PyPI,
# NumPy from Debian through --system-site-packages), then, from a folder outside the repository
# and without PYTHONPATH, tests/package/check_installed.py and the Python tests. With the CMake
# build tree given (default: build), its module must give the same bits as the installed one.
#   bash scripts/test-pip-package.sh [build-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build_dir=${1:-build}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

/usr/bin/python3 -m venv --system-site-packages "$work/venv"
start=$SECONDS
if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$work/venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir . >"$work/pip.log" 2>&1; then
  tail -n 40 "$work/pip.log"
  exit 1
fi
echo "pip install . took $((SECONDS - start)) s"

cp tests/package/check_installed.py "$work/"
cd "$work"
installed=$(env -u PYTHONPATH "$work/venv/bin/python" check_installed.py)
echo "${installed%$'\n'*}"
if [[ -d $root/$build_dir/python/normkit ]]; then
  built=$(PYTHONPATH="$root/$build_dir/python" /usr/bin/python3 \
    check_installed.py --digest-only)
  if [[ ${installed##*$'\n'} != "$built" ]]; then
    echo "installed package: FAILED: its results differ from $build_dir/python's module" >&2
    exit 1
  fi
  echo "installed package: the same bits as $build_dir/python's module"
fi

# Every Python test, now against the installed package (cwd outside the repository: nothing on
# sys.path but the tests' own folder and site-packages).
env -u PYTHONPATH PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=2 \
  "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/python"
