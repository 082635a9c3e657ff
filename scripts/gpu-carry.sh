#!/usr/bin/env bash
# Prepare what travels to a bare GPU machine (Python 3.12, torch, numpy 2, no network) in
# build/carry/ (git-ignored; the device tool's `carry` names it). Run on a machine with
# PyPI access. Idempotent: files already there are kept.
#
#   wheels/                 pinned wheels for CPython 3.12 (manylinux x86_64), no dependencies:
#                           funasr and what it imports (synthetic checkpoints, export, and
#                           AutoModel for the parity check), matplotlib and what it imports
#                           (the report's PNGs). Versions: those of the project's .venv, except
#                           omegaconf 2.4 (2.3 needs antlr4 4.9, published as a source archive
#                           only) and contourpy 1.4 / python-dateutil 4.0 (3.12 wheels)
#   tritonserver-py312.tar.xz
#                           from the nvidia-pytriton 0.7.0 wheel: tritonserver, the Python
#                           backend, the Python 3.12 stub and the libraries they load, with an
#                           empty `pytriton` package (the wheel's own imports numpy<2 code)
#   libpython3.12.so.1.0.xz the shared libpython the 3.12 stub links, used only where the
#                           machine's Python lacks one (PYTHON312 chooses where it comes from)
#
# loadtest/gpu-carry.txt lists the files and sizes; tests/test_gpu_bench.py checks that they
# and the tracked tree fit the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${CARRY:-build/carry}
PIP=${PIP:-python3 -m pip}
PYTHON312=${PYTHON312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
PYTRITON=nvidia-pytriton==0.7.0
WHEELS=(
    funasr==1.4.16 omegaconf==2.4.0 pyyaml==6.0.4 kaldiio==2.18.1 librosa==0.11.0
    lazy_loader==0.6 tqdm==4.70.1 requests==2.34.2 urllib3==2.8.0 idna==3.20
    charset_normalizer==3.5.3 certifi==2026.10.19.post1
    matplotlib==3.11.2 pillow==13.0.0 fonttools==4.68.0 kiwisolver==1.5.1 contourpy==1.4.0
    cycler==0.12.1 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0
)

download() {  # download DIR SPEC...: CPython 3.12 manylinux wheels, no dependencies
    local dir=$1
    shift
    $PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
}

mkdir -p "$CARRY/wheels"
echo "wheels -> $CARRY/wheels"
download "$CARRY/wheels" "${WHEELS[@]}"

bundle=$CARRY/tritonserver-py312.tar.xz
if [ ! -s "$bundle" ]; then
    echo "tritonserver bundle -> $bundle (xz takes about a minute)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    download "$tmp" "$PYTRITON"
    (cd "$tmp" && python3 -m zipfile -e nvidia_pytriton-*.whl wheel)
    mkdir -p "$tmp/bundle/pytriton/tritonserver/python_backend_stubs"
    server=$tmp/wheel/pytriton/tritonserver
    cp -a "$server/bin" "$server/backends" "$tmp/bundle/pytriton/tritonserver/"
    cp -a "$server/python_backend_stubs/3.12" "$tmp/bundle/pytriton/tritonserver/python_backend_stubs/"
    cp -a "$tmp/wheel/nvidia_pytriton.libs" "$tmp/bundle/"
    rm -f "$tmp"/bundle/nvidia_pytriton.libs/libpython3*  # the 3.13 stub's; 3.12 links the machine's
    chmod +x "$tmp"/bundle/pytriton/tritonserver/bin/tritonserver \
        "$tmp"/bundle/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub
    echo '"""Only the tritonserver binary and backends of nvidia-pytriton 0.7.0 (e2v.serve)."""' \
        >"$tmp/bundle/pytriton/__init__.py"
    tar -C "$tmp/bundle" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
        -cf - . | xz -9 -T1 >"$bundle.part"
    mv "$bundle.part" "$bundle"
fi

libpython=$CARRY/libpython3.12.so.1.0.xz
if [ ! -s "$libpython" ]; then
    lib=$("$PYTHON312" -c 'import sysconfig as s; print(s.get_config_var("LIBDIR") + "/" + s.get_config_var("INSTSONAME"))')
    [ -f "$lib" ] || { echo "error: $PYTHON312 has no shared libpython ($lib)" >&2; exit 1; }
    echo "libpython -> $libpython (from $lib)"
    xz -9 -T1 -c "$lib" >"$libpython.part"
    mv "$libpython.part" "$libpython"
fi

(cd "$CARRY" && find . -type f ! -name '*.part' -printf '%P %s\n' | LC_ALL=C sort) >loadtest/gpu-carry.txt
echo "carry ready: $(du -sh "$CARRY" | cut -f1) in $CARRY (listed in loadtest/gpu-carry.txt)"
