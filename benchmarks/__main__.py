"""``python -m benchmarks --scale {tiny,small,medium}``: run every benchmark, print one table,
write ``bench.json`` and ``bench.md`` (and, except at ``--scale tiny``, ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import SCALE_TABLE, SCALES, BenchResult, Figure
from vimpac.common.environment import describe_machine, machine

BENCHMARKS = ("tokenize", "loader", "training", "memory")
MODULES = {"tokenize": "tokenize_job"}   # never a module named like the stdlib tokenize
HERE = Path(__file__).resolve().parent
FOOTER = ("\nThe CPU machine is shared: absolute numbers vary with load, ratios much less. "
          "GPU figures: `benchmarks/gpu_check.sh` on one CUDA GPU. What the benchmarks led us to "
          "optimise, with before/after numbers: `benchmarks/OPTIMISATIONS.md`.\n")


def fmt_num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def cell(stat: object, unit: str = "") -> str:
    if stat is None:
        return "-"
    text = f"{fmt_num(stat.median)}" + (f" {unit}" if unit else "")
    if stat.n > 1:
        text += f" [{fmt_num(stat.min)}-{fmt_num(stat.max)}]"
    return text


def met_text(fig: Figure) -> str:
    return {True: "yes", False: "**no**", None: "-"}[fig.met]


def markdown(results: list[BenchResult], info: dict, scale: str, errors: dict[str, str]) -> str:
    lines = [f"Measured with `python -m benchmarks --scale {scale}` on {describe_machine(info)}.",
             "Values are medians over repeats, [min-max] in brackets; each ratio is value / "
             "baseline measured in the same run.", "",
             "| benchmark | figure | value | baseline | ratio | target | met? |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for f in res.figures:
            base = f"{f.baseline_name}: {cell(f.baseline, f.unit)}" if f.baseline else "-"
            note = f" ({f.note})" if f.note else ""
            lines.append(f"| {f.benchmark} | {f.figure}{note} | {cell(f.value, f.unit)} | {base} "
                         f"| {cell(f.ratio)} | {f.target_text} | {met_text(f)} |")
    for name, err in errors.items():
        lines.append(f"| {name} | FAILED: {err.splitlines()[-1][:120]} | - | - | - | - | **no** |")
    return "\n".join(lines) + "\n"


def print_table(results: list[BenchResult]) -> None:
    print(f"{'benchmark':<14} {'figure':<62} {'value':>12} {'ratio':>9} {'target':>14} met")
    for res in results:
        for f in res.figures:
            ratio = fmt_num(f.ratio.median) if f.ratio else "-"
            print(f"{f.benchmark:<14} {f.figure[:62]:<62} {fmt_num(f.value.median):>12} "
                  f"{ratio:>9} {f.target_text:>14} {met_text(f).strip('*')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--scale", choices=SCALES, default="small")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for bench.json and bench.md (default: ./bench-out)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for generated videos and archives (default: a temp dir)")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the markdown table here (default: benchmarks/RESULTS.md "
                             "unless --scale tiny)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    scale = SCALE_TABLE[args.scale]
    info = machine()
    print(describe_machine(info), flush=True)
    results, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"-- {name} (scale {args.scale})", flush=True)
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(f"benchmarks.{MODULES.get(name, name)}")
                res = module.run(scale, work)
            except Exception:  # a broken benchmark is reported, the others still run
                errors[name] = traceback.format_exc()
                print(errors[name], file=sys.stderr)
                continue
            res.seconds = time.perf_counter() - t0
            results.append(res)
            print(f"   {res.seconds:.1f} s", flush=True)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"scale": args.scale, "machine": info, "errors": errors,
            "benchmarks": {r.name: {"seconds": r.seconds,
                                    "figures": [f.to_json() for f in r.figures],
                                    "details": r.details} for r in results}}
    (args.out / "bench.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    md = markdown(results, info, args.scale, errors)
    (args.out / "bench.md").write_text(md)
    results_md = args.results or (None if args.scale == "tiny" else HERE / "RESULTS.md")
    if results_md is not None:
        results_md.write_text("# Performance\n\n" + md + FOOTER)
    print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.md'}"
          + (f" and {results_md}" if results_md else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
