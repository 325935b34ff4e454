"""Simulator throughput: isolated 6-band LSST stamps per second with 1 and 2 worker processes.

Run: ``python -m benchmarks simulate [--n 600]``. Writes ``results/simulate.{json,md}``.
Process start-up (spawn + galsim import + PSF set-up) is included, as a user would see it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks._common import write_results
from madness_ppl.simulate import simulate_dataset

#: ``python -m benchmarks --smoke``: this study on one tiny field (CI runs it).
SMOKE = ["--n", "8", "--workers", "1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600, help="stamps per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            simulate_dataset(
                f"{tmp}/d",
                kind="isolated",
                n=args.n,
                shard_size=max(args.n // (4 * workers), 1),
                workers=workers,
                seed=0,
                progress=False,
            )
            elapsed = time.perf_counter() - start
        rows.append(
            {
                "workers": workers,
                "stamps": args.n,
                "seconds": elapsed,
                "stamps_per_s": args.n / elapsed,
            }
        )
        print(rows[-1])
    base = rows[0]["stamps_per_s"]
    table = "| workers | stamps | seconds | stamps/s | speed-up vs 1 |\n|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {r['workers']} | {r['stamps']} | {r['seconds']:.1f} | {r['stamps_per_s']:.0f} | "
        f"{r['stamps_per_s'] / base:.2f} |"
        for r in rows
    )
    write_results("simulate", {"benchmark": "isolated 45x45x6 LSST stamps", "rows": rows}, table)
    print(table)


if __name__ == "__main__":
    main()
