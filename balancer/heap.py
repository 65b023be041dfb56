"""Give freed memory back to the OS after a burst (glibc keeps what Python frees in its heap).

A flood of big requests leaves little alive once it ends (every cache is bounded in bytes, and no
reference cycle outlives a call), but glibc's allocator keeps much of the freed heap, so RSS stays
near its peak. Every ``interval`` seconds, when the allocator holds at least ``threshold`` bytes
free (``mallinfo2``) and that (or RSS) grew by ``threshold`` since the last trim, ``malloc_trim(0)``
returns the free pages (~20 ms for ~100 MiB; it runs only when there is that much to give back).
Envoy's overload manager has the same action (``shrink_heap``). Linux with glibc >= 2.33 only; a
no-op elsewhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger("modelyard.balancer")

_PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc() -> tuple[Callable[[], int], Callable[[], object]] | None:
    """(free bytes held by malloc, malloc_trim(0)), or None without glibc >= 2.33."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        info, trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    trim.argtypes = [ctypes.c_size_t]
    return (lambda: int(info().fordblks)), (lambda: trim(0))


def rss_bytes() -> int:
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


async def trim_heap_forever(interval: float, threshold: int = 32 << 20) -> None:
    """Every ``interval`` s: ``malloc_trim`` when malloc holds ``threshold`` bytes free and either that
    grew by ``threshold`` since the last trim or RSS did (trimmed pages still count as free)."""
    fns = _glibc()
    if fns is None or interval <= 0:
        return
    free, trim = fns
    last_free, last_rss = 0, rss_bytes()
    while True:
        await asyncio.sleep(interval)
        held, rss = free(), rss_bytes()
        if held >= threshold and (held >= last_free + threshold or rss >= last_rss + threshold):
            trim()
            last_free, last_rss = held, rss_bytes()
            log.debug("heap trimmed: %.1f MiB free in malloc's arenas, RSS %.1f -> %.1f MiB",
                      held / 2**20, rss / 2**20, last_rss / 2**20)
        else:
            last_free, last_rss = min(last_free, held), min(last_rss, rss)
