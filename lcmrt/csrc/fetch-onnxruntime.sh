#!/usr/bin/env bash
# Lays out ONNX Runtime for the native runtime's build, installing nothing into the system:
#   DEST/include/  the C/C++ API headers of Debian 13's libonnxruntime-dev (Debian 12 has none), unpacked from
#                  the .deb fetched with a private apt state folder
#   DEST/lib/      libonnxruntime.so and libonnxruntime.so.1 (its soname), symlinks to the library the
#                  onnxruntime wheel ships; the C API is versioned, so older headers work with a newer library
# Usage: fetch-onnxruntime.sh DEST [PYTHON]    (PYTHON: the interpreter whose onnxruntime wheel to use)
set -euo pipefail
dest=$(mkdir -p "$1" && cd "$1" && pwd)
python=${2:-python3}
suite=trixie

if [ ! -f "$dest/include/onnxruntime_cxx_api.h" ]; then
  apt_dir="$dest/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dest/deb"
  echo "deb http://deb.debian.org/debian $suite main" > "$apt_dir/sources.list"
  apt_opts=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$apt_dir/lists"
            -o Dir::Cache="$apt_dir/cache" -o Debug::NoLocking=1 -o APT::Get::List-Cleanup=0)
  for try in 1 2 3; do
    apt-get "${apt_opts[@]}" -qq update && break
    [ "$try" = 3 ] && { echo "Cannot reach the Debian $suite package index." >&2; exit 1; }
    sleep $((10 * try))
  done
  (cd "$dest/deb" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
  unpacked="$dest/deb/root"
  rm -rf "$unpacked" && dpkg -x "$dest"/deb/libonnxruntime-dev_*.deb "$unpacked"
  headers=$(dirname "$(find "$unpacked" -name onnxruntime_cxx_api.h | head -1)")
  [ -n "$headers" ] || { echo "libonnxruntime-dev has no onnxruntime_cxx_api.h" >&2; exit 1; }
  rm -rf "$dest/include" && mkdir -p "$dest/include" && cp "$headers"/*.h "$dest/include/"
  rm -rf "$apt_dir" "$dest/deb"
fi

library=$("$python" - <<'PY'
import glob, os, onnxruntime
found = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.*")))
print(found[-1] if found else "")
PY
)
[ -n "$library" ] || { echo "$python's onnxruntime wheel has no libonnxruntime.so.*; pip install onnxruntime" >&2; exit 1; }
mkdir -p "$dest/lib"
ln -sf "$library" "$dest/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
echo "ONNX Runtime headers in $dest/include, library $library linked from $dest/lib"
