"""release_pages and releasing: drop this process's pages of read-only file mappings that match, leave others
alone, and never change what the mapping reads."""
import sys
import threading
import time

import numpy as np
import pytest

from lcmrt.mapped_files import files_or_under, release_pages, releasing

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_DONTNEED is Linux's")


def resident_bytes(path) -> int:
    """This process's resident bytes of its mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(maxsplit=1)[0]:  # a mapping's header line
            inside = line.rstrip("\n").endswith(str(path.resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_release_pages_advises_matching_read_only_mappings(tmp_path):
    data = np.arange(1 << 20, dtype=np.float32)
    (tmp_path / "weights").mkdir()
    path, other = tmp_path / "weights" / "model.bin", tmp_path / "other.bin"
    data.tofile(path)
    data.tofile(other)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    unrelated = np.memmap(other, dtype=np.float32, mode="r")
    writable = np.memmap(other, dtype=np.float32, mode="c")  # copy-on-write: its written pages are its own
    writable[:] = 1.0
    assert float(mapped.sum()) == float(data.sum()) and float(unrelated.sum()) == float(data.sum())
    assert resident_bytes(path) >= data.nbytes
    assert release_pages(files_or_under([], [tmp_path / "weights"])) >= data.nbytes
    assert resident_bytes(path) == 0
    assert release_pages(files_or_under([path], [])) >= data.nbytes
    assert release_pages(files_or_under([tmp_path / "missing.bin"], [tmp_path / "nowhere"])) == 0
    np.testing.assert_array_equal(mapped, data)  # read back from the file
    assert resident_bytes(path) >= data.nbytes
    np.testing.assert_array_equal(unrelated, data)
    assert (writable == 1.0).all()
    # a predicate matching every file still skips writable mappings
    assert release_pages(lambda name: name == str(other.resolve())) == unrelated.nbytes
    assert (writable == 1.0).all()


def test_releasing_drops_pages_while_the_block_runs(tmp_path):
    data = np.arange(1 << 20, dtype=np.float32)
    path = tmp_path / "blob.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    with releasing(files_or_under([path], []), interval=0.01):
        assert float(mapped.sum()) == float(data.sum())  # reads every page, as an import does
        deadline = time.monotonic() + 5
        while resident_bytes(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert resident_bytes(path) == 0  # released inside the block, by the thread
        np.testing.assert_array_equal(mapped, data)
    assert resident_bytes(path) == 0  # and once more after it
    assert not [t for t in threading.enumerate() if t.name == "lcmrt-release-pages"]
