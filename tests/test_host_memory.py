"""keep_freed_memory: glibc serves a large tensor from its heap and keeps it after free (checked with mallinfo2)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

# Prints glibc's mmapped bytes while a 64 MiB tensor is alive, then how much its heap grew, measured after the free.
PROBE = """
import ctypes, sys
import torch
from pipeline.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
heap_before = libc.mallinfo2().arena
tensor = torch.ones(64 << 20, dtype=torch.uint8)
mmapped = libc.mallinfo2().hblkhd
del tensor
print(mmapped, libc.mallinfo2().arena - heap_before)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    mmapped, heap_growth = out.stdout.split()
    return int(mmapped), int(heap_growth)


def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    try:
        import ctypes
        ctypes.CDLL(None).mallinfo2
    except AttributeError:
        pytest.skip("not glibc >= 2.33 (no mallinfo2)")
    default_mmapped, default_growth = _probe("default")
    kept_mmapped, kept_growth = _probe("keep")
    assert default_mmapped >= 64 << 20 and default_growth < 64 << 20  # by default: its own mmap, unmapped on free
    assert kept_mmapped < 64 << 20 and kept_growth >= 64 << 20        # kept: from the heap, still there after free
