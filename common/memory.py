"""Giving freed memory back to the operating system while vectors stream (no torch: the secure stages use it too)."""

import ctypes
import ctypes.util
import gc

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # glibc only
except (OSError, AttributeError):
    _LIBC = None


def release_memory(collect: bool = False) -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`). Streaming allocates and frees one tensor-sized
    block after another; once glibc has raised its mmap threshold those blocks come from the heap and the freed
    ones stay resident, so without this RSS creeps up by about a tensor per step. Called after each tensor.
    `collect`: run the cycle collector on the young generations first: a Flower message sits in reference cycles,
    so a whole-vector reply that was let go is only freed by it (once per such reply; a full collection in a process
    holding torch and transformers takes most of a second, the young ones a few ms)."""
    if collect:
        gc.collect(1)
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
