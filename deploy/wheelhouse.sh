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

# Every glibc up to bookworm's 2.36: manylinux2014 (2.17) covers most wheels; a few (lgpio
# for the Pi's GPIO) exist only for a newer one.
case "$arch" in
    aarch64|x86_64) platforms=(--platform "manylinux2014_$arch")
                    for minor in 24 26 27 28 31 34 35 36; do
                        platforms+=(--platform "manylinux_2_${minor}_$arch")
                    done ;;
    armv7l) platforms=(--platform manylinux2014_armv7l --platform linux_armv7l) ;;
    *) echo "unsupported --arch $arch (aarch64, x86_64, armv7l)" >&2; exit 2 ;;
esac

rm -rf "$out" build && mkdir -p "$out"
# The same code gives the same wheel, so the same release: the zip's times come from the last
# commit, not from now.
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800)
export SOURCE_DATE_EPOCH
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
