"""Time NCA training/inference steps and peak memory: ncatool's core against the naive reference.

Run from the repository root (same as ``ncatool bench``, which it calls)::

    .venv/bin/python benchmarks/bench_core.py --quick
    .venv/bin/python benchmarks/bench_core.py --json > bench.json

Importable: :func:`main` takes an argument list and returns the report dict. See
``benchmarks/README.md`` for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the benchmark, print the table (stderr) and optionally JSON (stdout)."""
    from ncatool.perf import tune_malloc

    tune_malloc()  # before torch is imported, as the CLI does
    import dataclasses

    from ncatool.bench import default_workloads, format_report, parse_variant, run_benchmarks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size2d", type=int)
    ap.add_argument("--batch2d", type=int)
    ap.add_argument("--steps2d", type=int)
    ap.add_argument("--size3d", type=int, action="append")
    ap.add_argument("--batch3d", type=int)
    ap.add_argument("--only", action="append", help="infer2d, train2d, infer3d, train3d")
    ap.add_argument("--variant", action="append", help="fp32, bf16, fp32+ckpt1, ...")
    ap.add_argument("--gpu-sizes", action="store_true", help="GPU-sized cases (see ncatool bench)")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    args = ap.parse_args(argv)

    workloads = default_workloads(
        args.quick, args.size2d, args.batch2d, args.steps2d, args.size3d, args.batch3d, gpu=args.gpu_sizes
    )
    if args.only:
        workloads = [w for w in workloads if w.kind in set(args.only)]
    if args.variant:
        for v in args.variant:
            parse_variant(v)
        workloads = [dataclasses.replace(w, variants=tuple(args.variant)) for w in workloads]
    report = run_benchmarks(
        workloads,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        memory=not args.no_memory,
        timing=not args.no_timing,
        roofline=not args.no_roofline,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    from rich.console import Console

    Console(stderr=True, width=140).print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
