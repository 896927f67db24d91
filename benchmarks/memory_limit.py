"""Does a generation complete under a memory limit? Runs `lcmrt generate` in a child process inside a memory
cgroup with the limit set (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes` with swap forbidden), once
per backend, and reports its exit status, the cgroup's peak charge (anonymous memory and the page cache the
process read: memory-mapped weights are charged too, but the kernel can drop them under the limit instead of
failing) and the child's own peak RSS. The engine folder's files are dropped from the page cache first, so
the child reads, and is charged for, every weight it maps.

    python -m benchmarks.memory_limit results/full/fused --limit 8G                    # every CPU backend
    python -m benchmarks.memory_limit engine/ --limit 8G --backend onnxruntime --steps 4

Needs a writable memory cgroup hierarchy (root in a container or VM, as on the machines lcmrt is tested on);
says so and exits 2 where there is none. Writes RESULTS/memory_limit.json when --results is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
BACKENDS = ("onnxruntime", "openvino", "auto")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _UNITS.get(text[-1:], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


class CgroupUnavailable(RuntimeError):
    pass


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit and no swap; `add(pid)` moves a process into it."""

    def __init__(self, limit: int):
        self.limit = limit
        name = f"lcmrt-limit-{os.getpid()}-{time.monotonic_ns()}"
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").is_file() and "memory" in (v2 / "cgroup.controllers").read_text().split():
            self.path, self.v2 = v2 / name, True
        else:
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / name, False
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit))  # memory + swap: no swap beyond the limit
        except OSError as e:
            self.remove()
            raise CgroupUnavailable(f"memory_limit: cannot create a memory cgroup at {self.path} ({e}); run as root on a "
                             "machine with a writable cgroup hierarchy.") from None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        try:
            if self.v2:
                events = (self.path / "memory.events").read_text().split()
            else:
                events = (self.path / "memory.oom_control").read_text().split()
            return int(events[events.index("oom_kill") + 1])
        except (OSError, ValueError, IndexError):
            return None

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache: a page is charged to the cgroup that first reads it, so
    weights cached by an earlier process would escape the limit."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_limited(folder: Path, backend: str, limit: int, steps: int, timeout: float) -> dict:
    """One generation in a fresh cgroup: exit code, seconds, the cgroup's peak, the child's peak RSS."""
    evict(folder)
    group = MemoryCgroup(limit)
    with tempfile.TemporaryDirectory(prefix="lcmrt-limit-") as tmp:
        cmd = [sys.executable, "-m", "lcmrt", "generate", str(folder), PROMPT, "--steps", str(steps), "--seed", "0",
               "--backend", backend, "-o", str(Path(tmp) / "out.png")]
        start = time.perf_counter()
        with open(Path(tmp) / "stderr", "w+") as err:
            # the child moves itself into the cgroup before exec, so everything it maps is charged there
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=lambda: group.add(os.getpid()))
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            _, status, rusage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
            timer.cancel()
            seconds = time.perf_counter() - start
            err.seek(0)
            stderr = err.read()
        code = os.waitstatus_to_exitcode(status)
        image = (Path(tmp) / "out.png").is_file()
    result = {"backend": backend, "limit_bytes": limit, "returncode": code, "completed": code == 0 and image,
              "seconds": round(seconds, 2), "cgroup_peak_bytes": group.peak(), "oom_kills": group.oom_kills(),
              "child_peak_rss_bytes": rusage.ru_maxrss * 1024, "stderr_tail": stderr[-600:] if code else ""}
    group.remove()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--limit", default="8G", help="memory limit, e.g. 8G, 512M (default 8G)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable; default: all three")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--results", type=Path, default=None, help="folder to write memory_limit.json to")
    args = parser.parse_args(argv)
    limit = parse_bytes(args.limit)
    try:
        rows = [run_limited(args.folder, backend, limit, args.steps, args.timeout)
                for backend in args.backend or BACKENDS]
    except CgroupUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{'backend':<12} {'limit':>7} {'completed':>9} {'cgroup peak':>12} {'peak RSS':>10} {'oom kills':>9} "
          f"{'seconds':>8}")
    for r in rows:
        peak = "?" if r["cgroup_peak_bytes"] is None else f"{r['cgroup_peak_bytes'] / 2**30:.2f} GiB"
        print(f"{r['backend']:<12} {limit / 2**30:>5.2f}G {str(r['completed']):>9} {peak:>12} "
              f"{r['child_peak_rss_bytes'] / 2**30:>6.2f} GiB {str(r['oom_kills']):>9} {r['seconds']:>8.1f}")
        if r["stderr_tail"]:
            print(f"  {r['backend']} failed: {r['stderr_tail'].strip().splitlines()[-1:]}")
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "memory_limit.json").write_text(json.dumps({"folder": str(args.folder), "rows": rows}, indent=2))
    return 0 if all(r["completed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
