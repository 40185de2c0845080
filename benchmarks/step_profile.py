"""Time (and optionally profile) one ncatool benchmark workload in this process.

The quick way to see what a change to the fast step buys, without the naive reference and the
subprocess machinery of ``ncatool bench``::

    .venv/bin/python benchmarks/step_profile.py --variant bf16 --mode train
    .venv/bin/python benchmarks/step_profile.py --threads 1 --kernels off     # PyTorch ops only
    .venv/bin/python benchmarks/step_profile.py --backend reference            # the plain step
    .venv/bin/python benchmarks/step_profile.py --variant fp32 --profile       # op table

It builds the 2D Growing-NCA workload exactly as ``ncatool bench`` does
(:func:`ncatool.bench.build_fast`), runs it twice to warm up, then ``--repeats`` times, and prints
the median wall time and cell-updates/s. Run it on an idle machine, one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="fp32", help="fp32, bf16, fp32+ckpt1, ...")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", choices=("auto", "reference", "fast"), default="auto")
    parser.add_argument(
        "--kernels", choices=("on", "off"), default="on", help="the fast step's fused operators"
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's op table")
    args = parser.parse_args()

    from ncatool.perf import tune_process

    tune_process(args.threads)  # before torch is imported: allocator settings
    from ncatool.bench import build_fast, fused_kernels_available
    from ncatool.models.fast_step import FastOptions
    from ncatool.models.nca import set_backend

    spec = {
        "dim": 2,
        "mode": args.mode,
        "size": [args.size, args.size],
        "batch": args.batch,
        "steps": args.steps,
        "device": "cpu",
        "seed": 0,
    }
    model, run = build_fast(spec, args.variant)
    kernels = args.kernels == "on" and args.backend != "reference"
    set_backend(model, args.backend, FastOptions(kernels=kernels))
    run()
    run()
    walls = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    updates = args.batch * args.size * args.size * args.steps
    print(
        f"{args.variant} {args.mode} {args.size}^2 b{args.batch} s{args.steps}, {args.threads} threads, "
        f"{args.backend}, fused kernels {kernels and fused_kernels_available()}: median {wall:.3f} s, {updates / wall / 1e6:.2f} M cell-upd/s"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
