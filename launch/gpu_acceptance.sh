#!/usr/bin/env bash
# The GPU acceptance run (mcat_ds/bench/acceptance.py) on a GPU machine that has only its stock image
# (torch, transformers, peft, triton, ...) and no package index. Three steps:
#
#   bash launch/gpu_acceptance.sh --pack                  # 1. on a machine with PyPI: fill .gpu/
#   (carry .gpu/ along with the checkout)                 # 2. it is git-ignored; ~8 MB
#   bash launch/gpu_acceptance.sh --out /tmp/acceptance   # 3. on the GPU: install from .gpu/, run
#
#   bash launch/gpu_acceptance.sh --smoke --out DIR       # the same steps at toy sizes on CPU (the tests)
#   bash launch/gpu_acceptance.sh --pack --python-version 3.11   # wheels for another interpreter
#
# --pack downloads what launch/gpu_wheels.txt lists, one version each, without dependencies: wheels
# for CPython 3.12 (the image's) on manylinux x86-64, DeepSpeed as its source archive, and writes
# .gpu/MANIFEST.tsv (name, version, import name, file, bytes). A run installs from .gpu/ only
# (pip --no-index, into $MCAT_SITE, else a private temporary folder removed when the run ends)
# whatever of it does not import here yet, builds DeepSpeed with DS_BUILD_OPS=0 (no compiled ops:
# torch's fused AdamW is used), checks every import and names each one that still fails. Then it
# runs the steps; rows go to benchmarks/*.csv; CSVs, logs and targets.md to --out (or $OUT).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${MCAT_PYTHON:-python3}
wheels=${MCAT_WHEELS:-$repo/.gpu}
site=${MCAT_SITE:-}
wanted=$repo/launch/gpu_wheels.txt
pins=$repo/constraints/transformers5.txt
pack=0
python_version=3.12
args=()
while (( $# )); do
    case "$1" in
        --pack) pack=1; shift ;;
        --python-version) python_version=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

say() { echo "gpu_acceptance: $*"; }

# version NAME: the version launch/gpu_wheels.txt or constraints/transformers5.txt pins for NAME.
version() {
    local name=$1 pinned
    pinned=$(grep -i -E "^${name//[-_]/[-_]}==" "$pins" | head -n 1 | cut -d= -f3)
    [ -n "$pinned" ] || { say "no version for $name in $pins: pin it in $wanted as $name==VERSION" >&2; return 1; }
    echo "$pinned"
}

# The wanted lines as "NAME VERSION IMPORT KIND", comments and blank lines dropped.
wanted_packages() {
    local spec import kind name version
    while read -r spec import kind; do
        [[ -z "$spec" || "$spec" == \#* ]] && continue
        name=${spec%%==*}
        if [[ "$spec" == *==* ]]; then version=${spec#*==}; else version=$(version "$name") || return 1; fi
        echo "$name $version $import ${kind:-wheel}"
    done < "$wanted"
}

pack_wheels() {
    local abi=cp${python_version/./} partial="$wheels.partial-$$" name version import kind file
    local packages; packages=$(wanted_packages) || return 1
    rm -rf "$partial" && mkdir -p "$partial" || return 1
    local binary=(--only-binary :all: --implementation cp --python-version "$python_version"
                  --abi "$abi" --abi abi3 --abi none
                  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
                  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
    { echo "# for CPython $python_version on manylinux x86-64, packed $(date -u +%Y-%m-%dT%H:%MZ) from $wanted"
      printf 'name\tversion\timport\tfile\tbytes\n'; } > "$partial/MANIFEST.tsv"
    while read -r name version import kind; do
        if [ "$kind" = sdist ]; then
            "$python" -m pip download -q --no-deps --no-binary :all: -d "$partial" "$name==$version" 2>&1 \
                | grep -v '^WARNING: Location' >&2
        else
            "$python" -m pip download -q --no-deps "${binary[@]}" -d "$partial" "$name==$version" 2>&1 \
                | grep -v '^WARNING: Location' >&2
        fi
        file=$(cd "$partial" && ls -t | grep -v MANIFEST.tsv | grep -i -E "^${name//[-_]/[-_]}-${version}[-.]" | head -n 1)
        [ -n "$file" ] || { say "could not download $name $version ($kind, Python $python_version)"; rm -rf "$partial"; return 1; }
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$version" "$import" "$file" "$(stat -c %s "$partial/$file")" \
            >> "$partial/MANIFEST.tsv"
    done <<< "$packages"
    rm -rf "$wheels" && mv "$partial" "$wheels"
    say "packed $(grep -c -v -e '^name' -e '^#' "$wheels/MANIFEST.tsv") files, $(du -sh "$wheels" | cut -f1) in $wheels:"
    grep -v '^#' "$wheels/MANIFEST.tsv" | column -t -s $'\t' 2>/dev/null || cat "$wheels/MANIFEST.tsv"
}

# not_importable IMPORT...: "IMPORT<tab>ERROR" for each name that does not import with $python.
not_importable() {
    "$python" - "$@" <<'EOF' 2>/dev/null | grep '^not importable' | cut -f2-
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:  # any failure counts: a broken install is as bad as none
        first = str(error).splitlines()[0] if str(error) else ""
        print("not importable", name, f"{type(error).__name__}: {first}", sep="\t", flush=True)
EOF
}

install_from_wheels() {
    local packages; packages=$(wanted_packages) || return 1
    local imports; imports=$(cut -d' ' -f3 <<< "$packages")
    # shellcheck disable=SC2086  # one import name per word
    local missing; missing=$(not_importable $imports | cut -f1)
    [ -n "$missing" ] || return 0
    local manifest=$wheels/MANIFEST.tsv
    if [ ! -f "$manifest" ]; then
        say "not importable here: $(echo $missing); no $manifest to install them from (fill it with" \
            "'bash launch/gpu_acceptance.sh --pack' where PyPI is reachable, and carry .gpu/ along)"
        return 1
    fi
    mkdir -p "$site"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    say "installing from $wheels into $site, with pip --no-index: $(echo $missing)"
    local name version import file build
    while IFS=$'\t' read -r name version import file _; do
        grep -qx "$import" <<< "$missing" || continue
        if [[ "$file" == *.whl ]]; then
            "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels/$file" 2>&1 \
                | grep -v -e '^WARNING: Location' -e 'already exists'
        else
            build=$(mktemp -d)
            tar xzf "$wheels/$file" -C "$build"
            (cd "$build"/* && DS_BUILD_OPS=0 "$python" -m pip install -q --no-index --no-deps --no-build-isolation \
                --no-compile --target "$site" . 2>&1 | grep -v -e '^WARNING: Location' -e 'already exists' | tail -n 5)
            rm -rf "$build"
        fi
    done < <(grep -v '^#' "$manifest" | tail -n +2)
    # shellcheck disable=SC2086
    local still; still=$(not_importable $imports)
    if [ -n "$still" ]; then
        while IFS=$'\t' read -r import error; do
            say "MISSING: $import does not import after installing from $wheels ($error)"
        done <<< "$still"
        return 1
    fi
    say "every package of launch/gpu_wheels.txt imports"
}

if (( pack )); then
    pack_wheels
    exit
fi
if [ -z "$site" ]; then
    # What lands on PYTHONPATH runs as this user: a fixed shared path such as /tmp/mcat-site would run
    # whatever another local user put there first. mktemp -d makes it ours alone (mode 700).
    site=$(mktemp -d "${TMPDIR:-/tmp}/mcat-site.XXXXXX") || exit 1
    trap 'rm -rf "$site"' EXIT
fi
install_from_wheels || say "going on: a step that needs what is missing fails, and targets.md says so"
# the project itself, from this checkout (kernels/ imports as mcat_kernels, as setup.py installs it)
if ! "$python" -c "import mcat_ds, mcat_kernels" 2>/dev/null; then
    mkdir -p "$site" && ln -sfn "$repo/kernels" "$site/mcat_kernels"
    export PYTHONPATH=$repo:$site${PYTHONPATH:+:$PYTHONPATH}
fi
cd "$repo"
# not exec: the shell stays to remove the temporary site when the run ends
"$python" -m mcat_ds.bench.acceptance "${args[@]}"
