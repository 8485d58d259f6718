"""Time CUDA forward tile / technique variants (--set d128 or d256) next to the default and
cuDNN in one run (fp16, batch*seqlen = 16k, hidden 2048).

    python scripts/diag_cuda_fwd.py [--set d128] [--seqlen 8192] [--jobs 6]   # compile in parallel, time
    python scripts/diag_cuda_fwd.py --ncu-target 256 [--causal]    # one launch of the default, for ncu
    python scripts/diag_cuda_fwd.py --ncu-target 128 --ncu-impl cudnn   # the same for cuDNN's SDPA
    python scripts/diag_cuda_fwd.py --ncu-target 128 --causal --persistent yes   # the grid forced
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from fa3_inductor.codegen import cuda_jit  # noqa: E402
from fa3_inductor.ops import cuda_impl  # noqa: E402
from fa3_inductor.spec import AttentionSpec  # noqa: E402

# (label, head dim, causal, config_for overrides)
D128 = [
    ("d128 default 128x128", 128, False, {}),
    ("d128 128x176", 128, False, dict(block_n=176)),
    ("d128 128x160", 128, False, dict(block_n=160)),
    ("d128 128x144", 128, False, dict(block_n=144)),
    ("d128 128x176 persistent", 128, False, dict(block_n=176, persistent=True)),
    ("d128 causal default", 128, True, {}),
    ("d128 causal persistent", 128, True, dict(persistent=True)),
    ("d128 causal 128x176", 128, True, dict(block_n=176)),
]
D256 = [
    ("d128 default", 128, False, {}),
    ("d256 default 128x80 s2", 256, False, {}),
    ("d256 no intra-WG overlap", 256, False, dict(intra_wg=False)),
    ("d256 no pingpong", 256, False, dict(pingpong=False)),
    ("d256 128x64 s2", 256, False, dict(block_n=64)),
    ("d256 128x48 s3", 256, False, dict(block_n=48, stages=3)),
    ("d256 persistent", 256, False, dict(persistent=True)),
    ("d256 causal default", 256, True, {}),
]


def _inputs(d, s, causal):
    B, H = max(1, 16384 // s), 2048 // d
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    return q, k, v, AttentionSpec(window_right=0 if causal else None), 4.0 * B * H * s * s * d / (2 if causal else 1)


def _cfg(d, causal, kw):
    return cuda_jit.config_for(d, "float16", has_wr=causal, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--ncu-target", type=int, default=None)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--ncu-impl", choices=("cuda", "cudnn", "fp8"), default="cuda",
                    help="with --ncu-target: our kernel, cuDNN's SDPA on the same inputs (the peer's profile), "
                         "or our FP8 kernel (bf16 inputs quantised before the profiled launch)")
    ap.add_argument("--set", choices=("d128", "d256"), default="d256")
    ap.add_argument("--persistent", choices=("yes", "no"),
                    help="with --ncu-target (cuda): force the persistent grid on or off")
    args = ap.parse_args(argv)
    variants = D128 if args.set == "d128" else D256
    if args.ncu_target:
        q, k, v, spec, _ = _inputs(args.ncu_target, args.seqlen, args.causal)
        scale = q.shape[-1] ** -0.5
        if args.ncu_impl == "fp8":
            from fa3_inductor.fp8 import attention, cuda_attention, quantize
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
            spec = AttentionSpec(window_right=0 if args.causal else None, out_dtype="bfloat16")
            signs = attention.signs_for(spec, q.shape[-1], q.device)
            bm, bn = cuda_attention.tiles_for(q.shape[-1], args.causal, None)
            qq = quantize.quantize_qkv(q, k, v, bm, bn, signs, permute=True)

            def run():
                cuda_attention.forward(q, k, v, scale, spec, signs, quantized=qq)
        elif args.ncu_impl == "cudnn":
            def run():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, scale=scale)
        else:
            grid = {} if args.persistent is None else {"persistent": args.persistent == "yes"}

            def run():
                cuda_impl.forward(q, k, v, None, None, None, None, scale, spec, **grid)
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        run()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        futs = {ex.submit(cuda_jit.compile_config, _cfg(d, c, kw)): lab for lab, d, c, kw in variants}
        for f in cf.as_completed(futs):
            try:
                f.result()
            except Exception as exc:
                print(f"build {futs[f]} failed: {str(exc)[:300]}")
    from triton.testing import do_bench
    for lab, d, causal, kw in variants:
        q, k, v, spec, fl = _inputs(d, args.seqlen, causal)
        scale = d ** -0.5
        try:
            rep = cuda_jit.ptxas_report(_cfg(d, causal, kw))
            ms = do_bench(lambda: cuda_impl.forward(q, k, v, None, None, None, None, scale, spec, **kw))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                ref = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
            print(f"{lab:28s} s{args.seqlen}: {fl / ms / 1e9:5.0f} TFLOP/s  cuDNN {fl / ref / 1e9:5.0f}  "
                  f"ratio {ref / ms:.2f}  regs {rep['registers']} spills {rep['spill_stores']}", flush=True)
        except Exception as exc:
            print(f"{lab:28s} failed: {str(exc).splitlines()[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
