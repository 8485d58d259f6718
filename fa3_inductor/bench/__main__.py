"""python -m fa3_inductor.bench --kernels [--quick] [--dtype bfloat16] [--out DIR] [--ablation]
                               --models   (fa3_inductor.bench.models, written separately)"""
from __future__ import annotations

import argparse
import sys

# kernels.PROVIDERS, spelled out so that --help does not import torch (a test checks they agree)
KERNEL_PROVIDERS = ("ours", "ours_atomic", "cuda", "cudnn", "flash", "flex")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fa3_inductor.bench")
    ap.add_argument("--kernels", action="store_true", help="attention kernel grid vs cuDNN/flash/flex")
    ap.add_argument("--models", action="store_true", help="end-to-end model benchmark")
    ap.add_argument("--quick", action="store_true", help="smaller grids (kernels: seqlen 1k/4k/16k; models: seqlen 4k)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--providers", default=",".join(KERNEL_PROVIDERS),
                    help="comma-separated subset of " + ",".join(KERNEL_PROVIDERS))
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="after this many seconds only 'ours' is still measured (keeps runs bounded)")
    ap.add_argument("--out", default=None, help="directory for CSV and PNG files")
    ap.add_argument("--ablation", action="store_true",
                    help="with --kernels: also the CUDA template's ablation table (hdim 128, 8k)")
    args, rest = ap.parse_known_args(argv)
    if not (args.kernels or args.models):
        ap.error("choose --kernels and/or --models")
    bad = [p for p in args.providers.split(",") if p not in KERNEL_PROVIDERS]
    if bad:
        ap.error(f"--providers: unknown {','.join(bad)}; allowed: {','.join(KERNEL_PROVIDERS)}")
    if args.kernels:
        import torch
        if not torch.cuda.is_available():
            print("fa3 bench --kernels: needs a CUDA GPU", file=sys.stderr)
            return 2
        from . import kernels
        kernels.run(quick=args.quick, dtype=args.dtype, providers=tuple(args.providers.split(",")),
                    passes=tuple(args.passes.split(",")), out_dir=args.out, budget_s=args.budget_s)
        if args.ablation:
            from . import cuda_rows
            print("\nCUDA template ablation, hdim 128, seqlen 8k, non-causal, " + args.dtype
                  + " (FA3 paper: 661 full / 582 no intra-WG overlap / 570 no warp specialization)")
            print(cuda_rows.format_rows(cuda_rows.ablation_rows(dtype=getattr(torch, args.dtype)),
                                        key_cols=("variant", "hdim", "seqlen")))
    if args.models:
        from . import models  # provided by the model benchmark (lead)
        extra = ["--seqlens", "4096"] if args.quick and "--seqlens" not in rest else []
        extra += ["--budget-s", str(args.budget_s)] if args.budget_s else []
        return models.main(rest + extra + (["--out", args.out] if args.out else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
