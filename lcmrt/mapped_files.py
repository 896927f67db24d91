"""Dropping a process's resident pages of memory-mapped files it no longer reads (Linux).

OpenVINO's CPU plugin reads a model's weights from a memory-mapped file (the saved model's `.bin`, or the
compiled blob in its model cache), repacks them into its own buffers and keeps the mapping. The pages it read
stay resident (file-backed: counted in RSS, dropped only under memory pressure), so the weights look held
twice. `MADV_PAGEOUT` (Linux 5.4+) asks the kernel to reclaim them now; a page read again later is faulted
back in from the file, so this changes memory, never results. Measured on the full-size SD1.5 UNet: RssFile
3.42 GB -> 0.07 GB after the first run, later runs as fast, the file pages not read again.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

MADV_PAGEOUT = 21  # linux/mman.h


def page_out(match) -> int:
    """Advise the kernel to reclaim this process's pages of read-only file mappings whose path satisfies `match`
    (a predicate on the path string); return the bytes advised. Writable mappings (copy-on-write arrays whose
    pages may hold written data) are left alone. Does nothing off Linux or where madvise refuses."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or "w" in parts[1] or not match(parts[5].rstrip("\n")):
            continue
        low, high = (int(x, 16) for x in parts[0].split("-"))
        if madvise(low, high - low, MADV_PAGEOUT) == 0:
            advised += high - low
    return advised


def files_or_under(files, folders):
    """A `page_out` predicate: one of `files`, or a file inside one of `folders`."""
    names = {str(Path(file).resolve()) for file in files}
    prefixes = tuple(str(Path(folder).resolve()) + "/" for folder in folders)
    return lambda path: path in names or path.startswith(prefixes)
