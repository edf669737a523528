"""memkit's benchmark suite: cost, overhead, sparsity, quality and memory of every memory.

``python -m benchmarks run [--quick] [--out DIR]`` measures and writes ``results.json``,
PNG plots and a Markdown page (and, in a full run, regenerates ``docs/benchmarks.md``);
``python -m benchmarks.soak`` streams thousands of segments through a tiny model with each
bounded memory and checks that nothing grows or goes non-finite.

memkit never imports this package. Benchmarks measure memkit as it runs in production:
with shape checking off. Importing this package before memkit switches the check off for
the process (``MEMKIT_TYPECHECK=0``); set ``MEMKIT_BENCH_TYPECHECK=1`` to keep it on. The
setting in force is recorded in every result file.
"""

import os
import sys

if "memkit" not in sys.modules:
    # the switch is read once, when memkit is imported: set it before anything imports memkit
    os.environ["MEMKIT_TYPECHECK"] = os.environ.get("MEMKIT_BENCH_TYPECHECK", "0")
