#!/usr/bin/env bash
# The main job on a fresh machine: installs espeak-ng when missing, builds .venv from the pinned
# versions in constraints/ (the CPU torch build first; reused while the pins are unchanged), then
# runs `mcat demo` (the whole curriculum on the built-in corpus, then decoding and scoring).
#
#   bash launch/demo.sh                          # writes runs/demo/report.json
#   bash launch/demo.sh --seed 3 --run-dir runs/demo-3
set -euo pipefail
source "$(dirname "$0")/env.sh"

apt_install espeak-ng:espeak-ng
pinned_venv "$REPO/.venv" "$REPO/constraints/transformers4.txt" "${MAIN_VENV_STEPS[@]}"
cd "$REPO"
exec .venv/bin/mcat demo --run-dir runs/demo "$@"
