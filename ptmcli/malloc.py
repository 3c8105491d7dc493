"""glibc's malloc, where torch's CPU tensors live, set up for training: freed memory kept for the next step, and no
per-thread cache of small blocks to split the heap; without glibc (macOS, Windows, musl) the heap is left as it is.
Also MKL's memory manager, which holds the buffers of torch's matrix products on x86 CPUs, turned off."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

# glibc's tcache keeps up to 7 freed blocks of each size up to 1 KB per thread, never merged with their neighbours.
# Scattered through the memory a step's activations were freed from, they cut it into hundreds of pieces too small for
# the next step's tensors, and the heap grows. Off, each family's bench run peaked 68-230 MB lower at the same speed
# (BART-mini 1,292-1,312 -> 1,148-1,156 MB; results.md, stop 49). glibc reads it only when a process starts.
TUNABLE = "glibc.malloc.tcache_count"
TUNED = f"{TUNABLE}=0"

# MKL keeps the buffers it packs matrices into for its next products, in a manager of its own that hands nothing back.
# Off, T5-mini's bench run peaked 34-44 MB lower and XLNet-mini's 16-18 MB, the other families within their noise, at
# the same speed (results.md, stop 50). MKL reads it at its first product, and any value turns the manager off.
MKL_MEMORY = {"MKL_DISABLE_FAST_MM": "1"}


def glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such name on this system
        return False


def tuned_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with glibc's tcache turned off, or None where nothing is to change: not glibc, or GLIBC_TUNABLES
    already says how many blocks the tcache keeps (a user's own setting wins; `...tcache_count=7` is glibc's
    default)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if not glibc() or any(item.split("=")[0] == TUNABLE for item in current.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNED}" if current else TUNED}


def restart_tuned() -> None:
    """Start this process's command again, in place (the same pid, for signals and launchers such as torchrun),
    with glibc's tcache turned off. Call before anything big is loaded: it is all loaded again. MKL's memory manager
    is turned off first, for this process and those it starts, whether it starts again or not."""
    for name, value in MKL_MEMORY.items():
        os.environ.setdefault(name, value)
    environ = tuned_environment(dict(os.environ))
    if environ is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()  # what is printed but still buffered would be lost
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:  # carry on with glibc's defaults
        return


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next step instead of handing it back to the system. By default
    a block of tens of MB (a gradient of a 50k-token embedding, 51 MB) is mapped afresh at every allocation and
    each of its pages faults in as it is first written: 1.3 million page faults in 45 GPT-mini steps, 0.3 million
    with blocks up to 512 MB taken from the heap and up to 1 GB of freed memory kept there, and 1.8 % more tokens/s
    for ~60 MB more peak memory (`bench.py --worker ptm gpt`, measured in results.md, stop 46)."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 512 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def release_freed_memory() -> None:
    """Hand the memory freed inside glibc's heap back to the system (`malloc_trim`), for when no step will need it
    again: kept by `keep_freed_memory`, it stays resident, and what a run does after its last step (matplotlib's
    curves, ~25 MB) then adds to a peak set by the steps."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2`, in bytes: `arena` held from the system, `uordblks` in use (freed blocks the tcache
    holds count as in use), `fordblks` free in `ordblks` pieces, `hblkhd` in blocks mapped on their own."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]  # fmt: skip

    @property
    def in_use(self) -> int:
        return self.uordblks + self.hblkhd  # blocks mapped on their own are in use and held alike

    @property
    def held(self) -> int:
        return self.arena + self.hblkhd


def heap_info() -> MallInfo2 | None:
    """glibc's figures for its heap now (tools and tests read them), or None without glibc >= 2.33."""
    libc = _libc()
    return libc.mallinfo2() if libc is not None and hasattr(libc, "mallinfo2") else None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, opened once (each opening allocates in the heap it would measure), or None."""
    if not glibc():
        return None
    libc = ctypes.CDLL("libc.so.6")
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = MallInfo2
    return libc
