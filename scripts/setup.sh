#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: Debian's Fashion-MNIST where apt is available, then a
# virtual environment (.venv) with the CPU build of torch and flain-cli with its test extras.
# `--flower` (opt-in) sets up .venv-flower instead: the same plus the 'flower' extra (Flower and
# Ray). flwr pins typer and rich below the releases .venv gets, so it gets a venv of its own and
# .venv keeps the newest that pyproject.toml allows: the CLI is tested with both.
# torch is pinned to 2.13.0 here (a CPU build) and constrained below 2.14 in pyproject.toml, so
# pip never swaps in a newer release with several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
EXTRAS="test,plot"
case "${1:-}" in
  "") ;;
  --flower) VENV=.venv-flower; EXTRAS="test,plot,flower" ;;
  *) echo "setup: error: unknown option $1 (the one option is --flower)" >&2; exit 2 ;;
esac

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
    || echo "setup: warning: could not install dataset-fashion-mnist; pass --data-dir to use Fashion-MNIST files you have" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
pip_install() {  # quiet on success, the whole log on failure
  local log
  log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: error: pip install $* failed" >&2
    exit 1
  fi
  rm -f "$log"
}
# one pip run: a second one spends ~12 s re-resolving and re-checking what the first installed
pip_install "torch==2.13.0" -e ".[$EXTRAS]"
"$VENV/bin/flain" --version >&2
