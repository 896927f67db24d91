"""The native runtime (lcmrt/csrc) for the parity tests: built (or brought up to date) once per test session with
CMake into build/native, as `make native` builds it (ONNX Runtime laid out by lcmrt/csrc/fetch-onnxruntime.sh into
build/onnxruntime), or taken from LCMRT_NATIVE_BUILD. Without cmake or a C++ compiler the tests skip here, and fail
in CI (CI=true), where .ci/run installs them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def native_build() -> Path:
    """The build folder holding liblcmrt.so, lcmrt-generate and tests/native/lcmrt-probe."""
    given = os.environ.get("LCMRT_NATIVE_BUILD")
    if given:
        return Path(given).resolve()
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{' and '.join(missing)} missing: .ci/run installs the native toolchain")
        pytest.skip(f"the native runtime needs {' and '.join(missing)}")
    build = ROOT / "build" / "native"
    _run(["bash", "lcmrt/csrc/fetch-onnxruntime.sh", "build/onnxruntime", sys.executable])
    _run(["cmake", "-S", ".", "-B", str(build), f"-DLCMRT_PYTHON={sys.executable}", "-DLCMRT_WERROR=ON"])
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    return build


@pytest.fixture(scope="session")
def probe(native_build):
    """Run `lcmrt-probe ARGS...` with optional stdin bytes; returns its stdout bytes (the test fails on an error)."""
    path = native_build / "tests" / "native" / "lcmrt-probe"

    def run(*args, stdin: bytes | None = None) -> bytes:
        result = subprocess.run([str(path), *map(str, args)], input=stdin, capture_output=True)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result.stdout

    return run
