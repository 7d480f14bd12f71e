#!/usr/bin/env bash
# Builds, on the controller, the wheels a box installs Circles from (pip --no-index), for the
# box's architecture and Python: a Raspberry Pi with 64-bit Raspberry Pi OS or Debian bookworm
# is `aarch64` and Python 3.11. Nothing is compiled on the box and the box needs no PyPI.
#
# Usage: deploy/wheelhouse.sh [--arch aarch64|x86_64|armv7l] [--python 3.11] [--extras pi]
#                             [--out DIR]        (default deploy/wheelhouse-<arch>)
# Writes DIR/*.whl and DIR/release.txt (the release name the box's playbook installs under:
# <version>-<digest of the wheels>), DIR/target.txt (arch and Python, checked on the box).
set -euo pipefail
cd "$(dirname "$0")/.."

arch=$(uname -m) python=3.11 extras="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --extras) extras=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
out=${out:-deploy/wheelhouse-$arch}
pip=${PIP:-pip}
[ -x .venv/bin/pip ] && [ -z "${PIP:-}" ] && pip=.venv/bin/pip

# manylinux2014 covers most wheels (glibc 2.17); a few (lgpio for the Pi's GPIO) exist only
# for a newer glibc that bookworm's 2.36 still satisfies.
case "$arch" in
    aarch64|x86_64) platforms=(--platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch"
                               --platform "manylinux_2_34_$arch") ;;
    armv7l) platforms=(--platform manylinux2014_armv7l --platform linux_armv7l) ;;
    *) echo "unsupported --arch $arch (aarch64, x86_64, armv7l)" >&2; exit 2 ;;
esac

rm -rf "$out" && mkdir -p "$out"
"$pip" wheel -q --disable-pip-version-check --no-deps --wheel-dir "$out" .
wheel=$(ls "$out"/circles-*.whl)
requirement="$wheel"
[ -n "$extras" ] && requirement="circles[$extras] @ file://$(realpath "$wheel")"
"$pip" download -q --disable-pip-version-check --dest "$out" --only-binary=:all: \
    "${platforms[@]}" --python-version "$python" --implementation cp "$requirement"

version=$(basename "$wheel" | cut -d- -f2)
digest=$(cd "$out" && sha256sum -- *.whl | sha256sum | cut -c1-12)
echo "$version-$digest" > "$out/release.txt"
echo "$arch $python ${extras}" > "$out/target.txt"
echo "wheelhouse $out: $(ls "$out"/*.whl | wc -l) wheels, release $(cat "$out/release.txt")"
