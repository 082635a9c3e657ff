#!/usr/bin/env bash
# The one command for a bare GPU machine (loadtest/GPU.md): install what build/carry holds
# into /tmp, build synthetic:base and synthetic:large, measure the model alone and served by
# tritonserver, live calls per GPU, and write the report to $OUT (else build/gpu-bench). Every phase has a hard
# time budget; the whole run ends within 8 minutes.
#
#   bash scripts/gpu-bench.sh            the GPU run (Python 3.12 + torch + CUDA, no network)
#   bash scripts/gpu-bench.sh --cpu      the dry run CI uses: synthetic:tiny on the CPU, in
#                                        the current environment (PYTHON, default python3)
#   ... --cpu --install                  the dry run through the carried install (rehearsal)
#
# Environment: OUT (report folder), PYTHON, CARRY (build/carry), E2V_GPU_WORK (/tmp/e2v-gpu),
# PRICE_PER_HOUR (USD per machine hour for the cost column), E2V_LIBPYTHON=carried (use the
# carried libpython even where the machine has one: the rehearsal).
#
# The install needs only the Python itself (zipfile, tarfile, lzma) and ldd: no pip, no xz.
# Exit status: 0 all phases ok, 1 some phase failed or ran out of time (the report says
# which), 2 bad arguments or an install that cannot work.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CARRY=${CARRY:-build/carry}
WORK=${E2V_GPU_WORK:-/tmp/e2v-gpu}
REPORT=${OUT:-build/gpu-bench}
INSTALL_BUDGET_S=45
mode=gpu
install=0
for arg in "$@"; do
    case $arg in
        --cpu) mode=cpu ;;
        --install) install=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

[ "$mode" = gpu ] && install=1  # the GPU run always installs from the carry
started=$(date +%s)
say() { printf '[install %3ds] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() { echo "error: $*" >&2; exit 2; }

# Our packages are one import namespace over several folders (pyproject's package-dir:
# e2v.client -> client/, ...). Nothing is installed here, so a folder of links gives
# Python the same view of this tree.
source_view() {
    local view=$WORK/source/e2v
    rm -rf "$WORK/source"
    mkdir -p "$view"
    ln -s "$PWD"/e2v/*.py "$view/"
    for folder in client export loadtest model_repository; do ln -s "$PWD/$folder" "$view/$folder"; done
    echo "$WORK/source"
}

# Unpacks the carry into $WORK and writes $WORK/env.sh (the exports the run needs).
install_carried() {
    local site=$WORK/site lib=$WORK/lib env=$WORK/env.sh
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || fail "$PYTHON is not Python 3.12: the carried tritonserver stub and wheels are for 3.12"
    for need in "$CARRY/tritonserver-py312.tar.xz" "$CARRY/libpython3.12.so.1.0.xz" "$CARRY/wheels"; do
        [ -e "$need" ] || fail "missing $need: run scripts/gpu-carry.sh where PyPI is reachable"
    done
    rm -rf "$site" "$lib"
    mkdir -p "$site" "$lib"
    say "wheels -> $site"
    for wheel in "$CARRY"/wheels/*.whl; do
        "$PYTHON" -m zipfile -e "$wheel" "$site"
    done
    say "tritonserver + Python backend + 3.12 stub -> $site"
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$CARRY/tritonserver-py312.tar.xz" "$site"
    local libdir soname
    libdir=$("$PYTHON" -c 'import sysconfig as s; print(s.get_config_var("LIBDIR") or "")')
    soname=libpython3.12.so.1.0
    if [ -f "$libdir/$soname" ] && [ "${E2V_LIBPYTHON:-}" != carried ]; then
        say "stub links this Python's $libdir/$soname"
    else
        say "this Python has no $soname: the carried one -> $lib"
        "$PYTHON" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
            "$CARRY/$soname.xz" >"$lib/$soname"
        libdir=$lib
    fi
    {
        echo "export LD_LIBRARY_PATH=$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
        echo "export PYTHONPATH=$(source_view):$site\${PYTHONPATH:+:\$PYTHONPATH}"
        echo "export MPLCONFIGDIR=$WORK/matplotlib"
    } >"$env"
    # shellcheck source=/dev/null
    source "$env"
    local stub=$site/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub
    local missing
    missing=$(LD_LIBRARY_PATH=$site/nvidia_pytriton.libs:$LD_LIBRARY_PATH ldd "$stub" \
        "$site/pytriton/tritonserver/bin/tritonserver" | grep "not found" || true)
    [ -z "$missing" ] || fail "libraries not found for tritonserver or the stub: $missing"
    # Presence only (find_spec imports nothing): the first real imports come in the phases.
    local missing_modules
    missing_modules=$("$PYTHON" -c 'import importlib.util as u
names = ("numpy", "torch", "yaml", "omegaconf", "matplotlib", "funasr", "tqdm", "requests", "pytriton")
print(" ".join(n for n in names if u.find_spec(n) is None))')
    [ -z "$missing_modules" ] || fail "not importable after the install: $missing_modules"
    say "done"
}

mkdir -p "$WORK"
if [ "$install" = 1 ]; then
    export -f install_carried source_view say fail
    export PYTHON CARRY WORK started
    rm -f "$WORK/env.sh"
    timeout "$INSTALL_BUDGET_S" bash -c install_carried \
        || fail "install failed (above) or took over its ${INSTALL_BUDGET_S} s budget"
    # shellcheck source=/dev/null
    source "$WORK/env.sh"
else
    PYTHONPATH=$(source_view)${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONPATH
fi

args=(--work "$WORK" --report "$REPORT")
[ -n "${PRICE_PER_HOUR:-}" ] && args+=(--price-per-hour "$PRICE_PER_HOUR")
[ "$mode" = cpu ] && args+=(--cpu)
# The tree's own e2v/ must not shadow the view: no current directory on sys.path, in this
# process and in the phases it starts.
export PYTHONSAFEPATH=1
exec "$PYTHON" -m e2v.loadtest.gpu.bench "${args[@]}"
