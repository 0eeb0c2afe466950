#!/usr/bin/env bash
# The GPU check from a bare copy of the repository: no install, no network.
#
#   bash benchmarks/gpu_check.sh                          # report in gpu_check.md, and on stdout
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # report, raw JSON and the log in $OUT
#   bash benchmarks/gpu_check.sh --sessions 1,8 --seconds 5      # any option of the check (see --help)
#
# The repository root is the package `edtalk_live`. Nothing is installed: a temporary folder holding an
# `edtalk_live` symlink to the root goes first on PYTHONPATH, so the check and the server and client processes
# it starts import this very tree (`pip install -e .` would need setuptools from the network for its isolated
# build). `timeout` ends the whole run after GPU_CHECK_TIMEOUT seconds (480) whatever happens; the check keeps
# itself within 450 s and rewrites its report after every phase, so a stopped run still leaves one.
# PYTHON picks the interpreter (default: the first of python3, python that imports torch).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      py="$candidate"
      break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "gpu_check.sh: error: no python that imports torch on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi

pp="$(mktemp -d)"
trap 'rm -f "$pp/edtalk_live"; rmdir "$pp" 2>/dev/null' EXIT
ln -s "$root" "$pp/edtalk_live"
export PYTHONPATH="$pp${PYTHONPATH:+:$PYTHONPATH}"
# ONNX exports go to a scratch cache unless one is set (the home folder may be read-only on a lent machine)
export EDTALK_LIVE_CACHE="${EDTALK_LIVE_CACHE:-${TMPDIR:-/tmp}/edtalk-live-cache}"

args=("$@")
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  case " $* " in *" --out "*|*" --out="*) ;; *) args+=(--out "$OUT/gpu_check.md") ;; esac
  case " $* " in *" --json "*|*" --json="*) ;; *) args+=(--json "$OUT/gpu_check.json") ;; esac
  exec 2> >(tee -a "$OUT/gpu_check.log" >&2)
fi

cd "$root" || exit 2
if ! "$py" -c "import edtalk_live.benchmarks.gpu_check" ; then
  echo "gpu_check.sh: error: edtalk_live does not import from $root with $py (see above)" >&2
  exit 2
fi
limit="${GPU_CHECK_TIMEOUT:-480}"
echo "gpu_check.sh: $py -m edtalk_live.benchmarks.gpu_check ${args[*]} (stopped after $limit s at the latest)" >&2
timeout --kill-after=20 "$limit" "$py" -m edtalk_live.benchmarks.gpu_check "${args[@]}"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_check.sh: stopped after $limit s; the report so far is in the --out file" >&2
fi
exit "$rc"
