"""`make bench`: every benchmark in its quick mode, one after another, each a subprocess.

Quick modes are for checking that the benchmarks run and for a rough figure; the recorded figures in
``benchmarks/RESULTS.md`` come from the full commands each benchmark's docstring gives. MovieLens-100k
(``bench_real.py``, ``bench_search.py``) needs the network once to fetch RecBole's wheel into its cache, so it is left out
unless ``--with-real`` is given.
"""

from __future__ import annotations

import subprocess
import sys
import time

QUICK = [
    ("gate power", ["-m", "benchmarks.bench_gate_power", "--quick"]),
    ("gates", ["benchmarks/bench_gates.py", "--repeats", "1"]),
    ("ingest", ["benchmarks/bench_ingest.py", "--rows", "20000", "--repeats", "1"]),
    ("drift", ["benchmarks/bench_drift.py", "--events", "20000", "--runs", "1"]),
    ("train", ["-m", "benchmarks.bench_train", "--preset", "small"]),
    ("serving", ["benchmarks/bench_serving.py", "--items", "2000", "--events", "5000", "--requests", "50"]),
    ("memory", ["benchmarks/bench_memory.py", "--quick"]),
]
REAL = [("real data (MovieLens-100k)", ["benchmarks/bench_real.py"]),
        ("search on real data (MovieLens-100k)", ["benchmarks/bench_search.py"])]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    runs = QUICK + (REAL if "--with-real" in argv else [])
    failed = []
    for name, args in runs:
        print(f"=== {name}: python {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, *args])
        print(f"=== {name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    print("all benchmarks ran" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
