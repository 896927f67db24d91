"""benchmarks/memory_limit.py on the tiny folder: a generation completes under a generous limit on every backend,
and a limit below what it needs stops it (the limit is real). Skips, saying why, where no memory cgroup can be
created (not root, or no writable hierarchy)."""
import json

import pytest

from benchmarks.memory_limit import CgroupUnavailable, MemoryCgroup, main, parse_bytes


def cgroup_unavailable() -> str | None:
    try:
        MemoryCgroup(1 << 30).remove()
    except CgroupUnavailable as e:
        return str(e)
    return None


_UNAVAILABLE = cgroup_unavailable()
pytestmark = pytest.mark.skipif(bool(_UNAVAILABLE), reason=f"needs a writable memory cgroup: {_UNAVAILABLE}")


def test_parse_bytes():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("8GiB") == 8 << 30
    assert parse_bytes("1000") == 1000


def test_the_tiny_folder_completes_under_a_limit_and_a_small_limit_stops_it(tiny_engine, tmp_path):
    assert main([str(tiny_engine), "--limit", "1G", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "memory_limit.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["onnxruntime", "openvino", "auto"]
    for r in rows:
        assert r["completed"] and r["oom_kills"] in (0, None) and 0 < r["cgroup_peak_bytes"] <= 1 << 30
        assert r["child_peak_rss_bytes"] > 10 << 20
    assert main([str(tiny_engine), "--limit", "30M", "--backend", "onnxruntime", "--results", str(tmp_path)]) == 1
    (row,) = json.loads((tmp_path / "memory_limit.json").read_text())["rows"]
    assert not row["completed"] and row["returncode"] != 0 and row["cgroup_peak_bytes"] <= 30 << 20

