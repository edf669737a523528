"""memkit's benchmark suite: cost, overhead, sparsity, quality and memory of every memory.

``python -m benchmarks run [--quick] [--out DIR]`` measures and writes ``results.json``,
PNG plots and a Markdown page (and, in a full run, regenerates ``docs/benchmarks.md``);
``python -m benchmarks.soak`` streams thousands of segments through a tiny model with each
bounded memory and checks that nothing grows or goes non-finite.

memkit never imports this package. Benchmarks measure memkit as it runs in production:
with shape checking off. Importing this package before memkit switches the check off for
the process (``MEMKIT_TYPECHECK=0``); set ``MEMKIT_BENCH_TYPECHECK=1`` to keep it on. The
setting in force is recorded in every result file.

Importing it also keeps glibc's ``malloc`` from handing freed memory back to the operating
system (``mallopt``: large blocks from the heap instead of ``mmap``, trim threshold 1 GiB). Without
it every large temporary tensor is a fresh ``mmap`` whose pages fault in on first touch: on
these machines an elementwise op over 2 MB then costs ~10x its arithmetic, and the memories
that make more temporaries look slower than they are. It is the CPU counterpart of a GPU's
caching allocator (PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same
reason). ``MEMKIT_BENCH_MALLOC=system`` measures with glibc's defaults instead; the setting in
force is recorded in every result file (``machine.malloc``).
"""

import os
import sys

if "memkit" not in sys.modules:
    # the switch is read once, when memkit is imported: set it before anything imports memkit
    os.environ["MEMKIT_TYPECHECK"] = os.environ.get("MEMKIT_BENCH_TYPECHECK", "0")


def _keep_freed_memory() -> str:
    """Tune glibc malloc as described above; returns what is in force (recorded with the results)."""
    if os.environ.get("MEMKIT_BENCH_MALLOC", "") == "system":
        return "system defaults (MEMKIT_BENCH_MALLOC=system)"
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_max, 0)
    except (OSError, AttributeError):
        return "system defaults (no glibc mallopt)"
    return "glibc mallopt: no mmap, trim threshold 1 GiB" if ok else "system defaults (mallopt refused)"


MALLOC = _keep_freed_memory()
