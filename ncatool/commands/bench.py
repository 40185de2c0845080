"""``ncatool bench``: cell-updates/s and peak memory of the NCA core against the naive reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes and few steps (about a minute on 2 cores).")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", metavar="<cpu|cuda|cuda:N>", help="Where to run both sides.")
    ] = "cpu",
    repeats: Annotated[
        int, typer.Option("--repeats", "-r", min=1, help="Timed runs per implementation.")
    ] = 3,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="Intra-op threads for both sides (default: PyTorch's, the core count)."
        ),
    ] = None,
    size2d: Annotated[
        int | None, typer.Option("--size2d", min=4, help="2D grid edge (64; quick 32).")
    ] = None,
    batch2d: Annotated[int | None, typer.Option("--batch2d", min=1, help="2D batch (8; quick 4).")] = None,
    steps2d: Annotated[int | None, typer.Option("--steps2d", min=1, help="2D steps (64; quick 16).")] = None,
    size3d: Annotated[
        list[int] | None,
        typer.Option("--size3d", min=4, help="3D volume edge, repeatable (32 and 64; quick 16)."),
    ] = None,
    batch3d: Annotated[int | None, typer.Option("--batch3d", min=1, help="3D batch (2; quick 1).")] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only these kinds: infer2d, train2d, infer3d, train3d (repeatable)."),
    ] = None,
    variants: Annotated[
        list[str] | None,
        typer.Option("--variant", help="ncatool variants, repeatable: fp32, bf16, fp32+ckpt1, ..."),
    ] = None,
    gpu_sizes: Annotated[
        bool,
        typer.Option(
            "--gpu-sizes",
            help="GPU-sized cases: 2D 256^2 x 32 (inference 64 steps, training 32), 3D 128^3 x 2 "
            "inference and training, 256^3 x 1 inference (size and batch options do not apply).",
        ),
    ] = False,
    no_roofline: Annotated[
        bool,
        typer.Option(
            "--no-roofline", help="Skip measuring the machine's ceilings (and the roofline fractions)."
        ),
    ] = False,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Skip the memory phase.")] = False,
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Skip the timing phase.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the JSON report here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")] = False,
) -> None:
    """Time training and inference steps (cell-updates/s) and peak memory, 2D and 3D, for ncatool's
    NCA core and the naive reference (ncatool/bench_reference.py, in its own plain-PyTorch
    subprocess: as ports run it, and again with ncatool's allocator tuning).

    Same sizes, steps, threads and weights on every side; one warm-up, then interleaved runs;
    medians. First measures the machine's matrix-product ceilings and copy bandwidth and reports
    each result as a fraction of its roofline.
    """
    import dataclasses
    import json

    from ncatool.bench import default_workloads, format_report, parse_variant, run_benchmarks
    from ncatool.console import emit_json, err, info, state, warn
    from ncatool.errors import NcaError

    workloads = default_workloads(quick, size2d, batch2d, steps2d, size3d, batch3d, gpu=gpu_sizes)
    if only:
        kinds = {k.strip() for item in only for k in item.split(",") if k.strip()}
        unknown = kinds - {"infer2d", "train2d", "infer3d", "train3d"}
        if unknown:
            raise NcaError(f"unknown --only kind(s) {sorted(unknown)}")
        workloads = [w for w in workloads if w.kind in kinds]
    if variants:
        chosen = tuple(v.strip() for item in variants for v in item.split(",") if v.strip())
        for v in chosen:
            parse_variant(v)
        workloads = [dataclasses.replace(w, variants=chosen) for w in workloads]
    report = run_benchmarks(
        workloads,
        repeats=repeats,
        threads=threads,
        device=device,
        memory=not no_memory,
        timing=not no_timing,
        progress=None if state.quiet else info,
        roofline=not no_roofline,
    )
    mach = report["machine"]
    if mach["load_before"] and mach["cores"] and max(mach["load_before"][0], mach["load_after"][0]) > 0.5:
        warn(
            f"other processes are running (load {mach['load_before'][0]} -> {mach['load_after'][0]} on "
            f"{mach['cores']} cores): multi-threaded timings stall on a busy machine; compare ratios from "
            "a quiet machine, or run with --threads 1"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if not state.quiet:
        from rich.console import Console

        Console(stderr=True, highlight=False, width=max(err.width, 140)).print(format_report(report))
        if not report["targets"]:
            info("(the issue's targets are defined at the full sizes: run without --quick to check them)")
        for t in report["targets"]:
            what = "speedup" if "speedup" in t else "memory"
            value = t.get("speedup", t.get("memory"))
            mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
            sign = ">=" if what == "speedup" else "<="
            tuned = f", {t['speedup_tuned']:.2f} vs naive-tuned" if t.get("speedup_tuned") else ""
            err.print(
                f"target {t['workload']} {t['variant']}: {what} {value:.2f} ({sign} {t['bound']}) {mark}"
                f"{tuned}"
            )
        for row in report["results"]:
            if row.get("error"):
                warn(f"{row['workload']} {row['variant']}: {row['error']}")
    if json_out:
        emit_json(report)
