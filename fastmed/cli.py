"""The ``fastmed`` command line: ``fastmed bench`` and ``fastmed info``."""
from __future__ import annotations

import argparse
import json
import sys


_BENCH_OPS = ("dice_ce", "optimize", "resample", "sliding_window")  # fastmed.bench.OPS (bench imports torch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastmed", description="fast ops for medical image segmentation")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmark fastmed against MONAI on this machine and print a table")
    b.add_argument("--quick", action="store_true", help="the main cases only, fewer repeats (under two minutes on a 2-core CPU)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    b.add_argument("--ops", nargs="*", choices=_BENCH_OPS, metavar="OP",
                   help="only these: dice_ce (fused Dice + CE losses), optimize (fastmed.optimize on U-Nets: eval "
                        "forward and training steps; with --device cuda also one conv -> norm -> act block forward + "
                        "backward against eager and torch.compile), resample, sliding_window")
    b.add_argument("--reps", type=int, default=None, help="timed repeats per measurement")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    b.add_argument("--out", default=None, help="also save the results as JSON to this new file")
    b.add_argument("--save", action="store_true", help="save the results under benches/results/<device>-<date>.json")
    sub.add_parser("info", help="print what this build of fastmed contains (fastmed.build_info())")
    args = parser.parse_args(argv)

    if args.cmd == "info":
        import fastmed

        print(json.dumps(fastmed.build_info(), indent=1, default=str))
        return 0

    import torch

    from . import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastmed bench: --device cuda needs a visible CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.reps is not None and args.reps < 1:
        print("fastmed bench: --reps must be at least 1", file=sys.stderr)
        return 2
    report = bench.run(quick=args.quick, device=args.device, reps=args.reps, ops=args.ops, memory=not args.no_memory)
    tables = [bench.format_table(report) if report["results"] else "", bench.format_inference_table(report),
              bench.format_resample_table(report), bench.format_optimize_table(report)]
    print("\n\n".join(t for t in tables if t))
    lm = report.get("label_map_memory")
    if lm:
        print(f"\n{lm['op']}: {lm['case']}: peak extra memory {lm['peak_extra_mb']:.0f} MB "
              f"(the full float32 result would be {lm['full_result_fp32_mb']:.0f} MB), {lm['seconds']:.1f} s")
    path = args.out or (bench.default_result_path(report) if args.save else None)
    if path:
        try:
            print(f"saved {bench.save(report, path)}")
        except FileExistsError as exc:
            print(f"fastmed bench: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
