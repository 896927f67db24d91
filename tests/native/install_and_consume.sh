#!/usr/bin/env bash
# ctest: `cmake --install` this build into a prefix, build tests/native/consumer against it with find_package(lcmrt),
# and run it on an engine folder. The installed liblcmrt finds ONNX Runtime beside itself ($ORIGIN), not in the
# build's folders, which the check hides by running with a clean LD_LIBRARY_PATH.
# Usage: install_and_consume.sh BUILD_DIR SOURCE_DIR ENGINE_FOLDER [CXX_FLAGS]
#   CXX_FLAGS: the consumer's compile and link flags (a sanitized lcmrt needs a sanitized program)
set -euo pipefail
build=$1 source=$2 folder=$3 flags=${4:-}
work="$build/consumer-test"
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" > /dev/null
cmake -S "$source/tests/native/consumer" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
      -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" > /dev/null
cmake --build "$work/build" > /dev/null
onnxruntime=$(env -u LD_LIBRARY_PATH ldd "$work/build/fox" | awk '/libonnxruntime/ {print $3}')
[ "$(dirname "$onnxruntime")" = "$work/prefix/lib" ] || { echo "ONNX Runtime resolved to '$onnxruntime'" >&2; exit 1; }
env -u LD_LIBRARY_PATH "$work/build/fox" "$folder" "$work/fox.png"
test -s "$work/fox.png"
