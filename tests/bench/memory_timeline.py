"""Where in a whole `ptm pretrain` run its peak memory falls: the bench's ptm side for one family (the same overrides
and kept corpus as `bench.py --worker ptm`), run in this process while a thread samples it every 3 ms.
Run: python tests/bench/memory_timeline.py FAMILY  (bert roberta gpt t5 bart electra xlnet)
Prints, for each half second, the most of: the process's resident memory, what glibc's heap has in live blocks (in
use) and what it holds from the system (held; their difference is freed memory kept in the heap), then the run's
tokens/s and peak RSS as the bench reports them. The process starts as `ptm` starts (ptmcli/malloc.py)."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

from ptmcli.malloc import heap_info, restart_tuned

restart_tuned()  # before torch is imported, as the `ptm` command starts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the bench's own overrides)
from profile_step import current_rss_mb  # noqa: E402


def main() -> None:
    name = next((a for a in sys.argv[1:] if not a.startswith("--")), "t5")
    if heap_info() is None:
        raise SystemExit("memory_timeline.py reads glibc's heap (mallinfo2, glibc >= 2.33): Linux with glibc only")
    bench.keep_corpus(name, Path(tempfile.mkdtemp()))
    rows: dict[int, list[int]] = {}
    started = time.perf_counter()

    def sample() -> None:
        while True:
            heap = heap_info()
            now = [int(current_rss_mb()), heap.in_use >> 20, heap.held >> 20]
            slot = int((time.perf_counter() - started) * 2)
            rows[slot] = [max(a, b) for a, b in zip(rows.get(slot, now), now)]
            time.sleep(0.003)

    threading.Thread(target=sample, daemon=True).start()
    result = bench.run_ptm(name, Path(tempfile.mkdtemp()))
    print("   time  resident   in use     held  (MB, the most in each half second)")
    for slot in sorted(rows):
        print(f"{slot / 2:6.1f}s {rows[slot][0]:9,} {rows[slot][1]:8,} {rows[slot][2]:8,}")
    print(f"{name}: {result['tokens_per_s']:,.0f} tokens/s, peak RSS {result['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
