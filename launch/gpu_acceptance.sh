#!/usr/bin/env bash
# The GPU acceptance run (mcat_ds/bench/acceptance.py): on a bare GPU machine, installs what is missing
# from a local wheel folder, then runs every GPU-only path and benchmark in <= 8 minutes and ends
# with the targets table. Rows go to benchmarks/*.csv; CSVs, logs and targets.md to --out (or $OUT).
#
#   bash launch/gpu_acceptance.sh --out /tmp/acceptance [--wheels DIR]
#   bash launch/gpu_acceptance.sh --smoke --out /tmp/acceptance        # toy sizes on CPU (the tests)
#
# The wheel folder (default: .gpu/, else ../shared/gpu/) holds what a bare torch + transformers + peft
# + triton machine lacks: DeepSpeed's sdist (built with DS_BUILD_OPS=0), liger-kernel, webdataset and
# their pure-Python needs (hjson, pydantic, ...). Fill it on a machine with PyPI:
#   pip download --no-deps -d .gpu deepspeed liger-kernel webdataset braceexpand hjson pydantic \
#       pydantic-core annotated-types typing-inspection
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${MCAT_PYTHON:-python3}
wheels=""
args=()
while (( $# )); do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -z "$wheels" ]; then
    for candidate in "$repo/.gpu" "$repo/../shared/gpu"; do
        [ -d "$candidate" ] && { wheels=$candidate; break; }
    done
fi

site=${MCAT_SITE:-/tmp/mcat-site}
missing=()
smoke=0
for arg in "${args[@]}"; do [ "$arg" = "--smoke" ] && smoke=1; done
if (( ! smoke )); then  # the smoke run uses this machine's environment as it is (CPU: no liger)
    "$python" -c "import deepspeed" 2>/dev/null || missing+=(deepspeed)
    "$python" -c "import webdataset" 2>/dev/null || missing+=(webdataset)
    "$python" -c "import liger_kernel" 2>/dev/null || missing+=(liger-kernel)
fi
if (( ${#missing[@]} )); then
    if [ -z "$wheels" ]; then
        echo "gpu_acceptance: missing ${missing[*]} and no wheel folder (--wheels DIR); the steps needing them will fail"
    else
        echo "gpu_acceptance: installing ${missing[*]} from $wheels into $site"
        for wheel in "$wheels"/*.whl; do  # one by one: a wheel for another Python is skipped, not fatal
            "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" >/dev/null 2>&1 \
                || echo "gpu_acceptance: skipped $(basename "$wheel") (not installable here)"
        done
        if ! PYTHONPATH=$site "$python" -c "import deepspeed" 2>/dev/null && ls "$wheels"/deepspeed-*.tar.gz >/dev/null 2>&1; then
            build=$(mktemp -d)
            tar xzf "$wheels"/deepspeed-*.tar.gz -C "$build"
            (cd "$build"/deepspeed-* && DS_BUILD_OPS=0 "$python" -m pip install -q --no-deps --no-build-isolation \
                --target "$site" . 2>&1 | tail -3)
        fi
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
# the project itself, from this checkout (kernels/ imports as mcat_kernels, as setup.py installs it)
if ! "$python" -c "import mcat_ds, mcat_kernels" 2>/dev/null; then
    mkdir -p "$site" && ln -sfn "$repo/kernels" "$site/mcat_kernels"
    export PYTHONPATH=$repo:$site${PYTHONPATH:+:$PYTHONPATH}
fi
cd "$repo"
exec "$python" -m mcat_ds.bench.acceptance "${args[@]}"
