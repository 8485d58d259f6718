"""Compile check and GPU check/timing of the Gluon attention forward, the Triton implementation's
forward on sm_90 (kernel: kernels/triton/gluon_fwd.py.tmpl, host side: fa3_inductor/ops/gluon_fwd.py;
this script was its prototype and now only drives it: one kernel, one copy).

The kernel's design (FA3-style: 1-warp TMA producer, two consumer warpgroups in pingpong with
setmaxnreg budgets, async wgmma with the softmax under the PV GEMM, 4-D TMA over the tensors'
own strides) is described in the template.  The prototype's "coop" variant (one 8-warp consumer
partition) measured slower everywhere and was dropped.

Variants (both the package kernel, the PERSISTENT constexpr and prepare(persistent=...)):
  tiles       the tile grid: one CTA per 128-row query tile, grid (cdiv(Sq, 128), B * Hq)
  persistent  one CTA per SM looping over a static tile list (order: gluon_fwd.choose_schedule)
The GPU run checks both against float64 and times them interleaved on the same inputs (median
of rounds, rounds alternate the order) next to cuDNN: d128 / d256, causal and not, S = 1k..16k
with b * s = 16k tokens and hidden 2048.

Usage:
  python scripts/gluon_fwd_proto.py --compile-only   # no GPU: AOT compile for sm_90a + ptxas -v
  python scripts/gluon_fwd_proto.py --quick          # GPU: check + time, ~2-2.5 min on an H100
  python scripts/gluon_fwd_proto.py                  # GPU: more check shapes and rounds (~4 min)
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import triton

import proto_child  # scripts/: the child-process runner both prototypes share

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fa3_inductor.bench import kernels as kernel_grid  # noqa: E402  (the benchmarks' FLOP count)
from fa3_inductor.ops import gluon_fwd  # noqa: E402

VARIANTS = ("tiles", "persistent")
ALIASES = {"pingpong": "tiles"}     # the old name of the tile-grid kernel (old command lines)
HEAD_DIMS = gluon_fwd.HEAD_DIMS     # d64 stays on the tl kernel (not measured against it yet)
SEQS = (1024, 2048, 4096, 8192, 16384)


def make_gluon_attention_fwd(q, k, v, causal=False, sm_scale=None, variant="tiles"):
    """q, k, v: [B, H, S, D] fp16/bf16 on an sm_90 GPU (any TMA-readable strides).  Returns
    (launch, O, LSE); descriptors are built once so that timing measures the kernel."""
    variant = ALIASES.get(variant, variant)
    assert variant in VARIANTS, variant
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return gluon_fwd.prepare(q, k, v, sm_scale, bool(causal), False, persistent=variant == "persistent")


# --------------------------------------------------------------------------------------------
# AOT compile check (no GPU needed)
# --------------------------------------------------------------------------------------------
def compile_check(dump_dir=None, variants=VARIANTS) -> bool:
    ok_all = True
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    print(f"Gluon FA3-style forward, AOT for sm_90a (triton {triton.__version__})")
    print(f"{'D':>4} {'dtype':>5} {'causal':>6} {'variant':>10} {'BMxBN/st':>10} {'regs':>5} {'spill st/ld':>12} "
          f"{'smem(KB)':>9} {'SASS regs':>9} {'setmaxnreg':>32} {'wgmma':>6} {'regA':>5} {'wait N':>7} "
          f"{'overlap':>7} {'tma4d':>5}")
    for D in HEAD_DIMS:
        for dt in ("fp16", "bf16"):
            for causal in (False, True):
                for variant in variants:
                    ok_all &= _compile_one(D, dt, causal, variant, dump_dir)
    print(f"regs: ptxas's per-thread count (the launch bound, maxnreg {gluon_fwd.MAXNREG}); setmaxnreg moves "
          "the consumers to 240 and the producer to 24.\nSASS regs: highest register used + 1 in the SASS "
          "(the consumers' real footprint, <= 240; 'L<n>' would count local-memory LDL/STL).\n"
          "overlap: a wgmma group committed while another is outstanding (S_j and P_{j-1}V_{j-1}).")
    return ok_all


def _compile_one(D, dt, causal, variant, dump_dir) -> bool:
    BM, BN, NS = gluon_fwd.CONFIGS[D]
    t0 = time.time()
    tag = f"{D:>4} {dt:>5} {int(causal):>6} {variant:>10}"
    try:
        ck = gluon_fwd.aot_compile(D, causal, dt, persistent=variant == "persistent")
    except Exception as e:  # noqa: BLE001 -- report and go on
        print(f"{tag} COMPILE ERROR: {type(e).__name__}: {str(e)[-300:]}")
        return False
    ptx = ck.asm["ptx"]
    if dump_dir:
        for ext in ("ptx", "ttgir"):
            with open(os.path.join(dump_dir, f"d{D}_{dt}_c{int(causal)}_{variant}.{ext}"), "w") as f:
                f.write(ck.asm[ext])
    pa = gluon_fwd.ptxas_report(ptx)
    ev = gluon_fwd.ptx_evidence(ptx)
    ok = (pa["ok"] and ev["wgmma"] > 0 and ev["setmaxnreg"] and ev["two_groups_in_flight"]
          and pa["spill_stores"] == 0 and pa["spill_loads"] == 0 and not pa["sass_local"])
    spill = f"{pa['spill_stores']}/{pa['spill_loads']}" + (" SERIALIZED" if pa["serialized_wgmma"] else "")
    sass = f"{pa['sass_max_reg']}" + (f" L{pa['sass_local']}" if pa["sass_local"] else "")
    print(f"{tag} {f'{BM}x{BN}/{NS}':>10} {pa['regs']!s:>5} {spill:>12} "
          f"{ck.metadata.shared / 1024:>9.1f} {sass:>9} "
          f"{','.join(f'{a}{n}' for a, n in ev['setmaxnreg']):>32} {ev['wgmma']:>6} "
          f"{ev['wgmma_reg_a']:>5} {','.join(ev['wait_group_args']):>7} "
          f"{str(ev['two_groups_in_flight']):>7} {str(ev['tma_4d']):>5}  ({time.time() - t0:.1f}s)"
          + ("" if pa["ok"] else "  PTXAS FAILED: " + pa["log"][-300:]), flush=True)
    return bool(ok)


# --------------------------------------------------------------------------------------------
# GPU check + benchmark
# --------------------------------------------------------------------------------------------
def _one_instantiation(D, causal, variants, quick=False):
    """Runs in a child process: for each variant, correctness (B=2, H=4, S in 1000/4097, plus 128
    without --quick; vs a float64 reference and torch's fp16 eager error), NaN check, then the
    timing grid: every variant and cuDNN SDPA on the same inputs, interleaved in rounds.
    Prints one 'RESULT {json}' line per result."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    dt = torch.float16

    emit = proto_child.emit

    ok_variant = {v: True for v in variants}
    torch.manual_seed(0)
    for S in ((1000, 4097) if quick else (128, 1000, 4097)):
        B, H = 2, 4
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
        scale = 1.0 / math.sqrt(D)
        mask = torch.ones(S, S, device=dev, dtype=torch.bool).tril() if causal else None
        refs = []               # float64 reference and torch fp16 eager, one head at a time
        err_eager = 0.0
        for b in range(B):
            for h in range(H):
                q64, k64, v64 = (t[b, h].double() for t in (q, k, v))
                s64 = (q64 @ k64.T) * scale
                if causal:
                    s64 = s64.masked_fill(~mask, float("-inf"))
                refs.append((torch.softmax(s64, -1) @ v64, torch.logsumexp(s64, -1)))
                s16 = (q[b, h] @ k[b, h].T) * scale
                if causal:
                    s16 = s16.masked_fill(~mask, float("-inf"))
                eager = torch.softmax(s16, -1) @ v[b, h]
                err_eager = max(err_eager, (eager.double() - refs[-1][0]).abs().max().item())
                del s64, s16, eager
        for variant in variants:
            if not ok_variant[variant]:
                continue
            try:
                launch, o, lse = make_gluon_attention_fwd(q, k, v, causal, scale, variant)
                proto_child.guarded_first_call(launch, f"{variant} D={D} causal={int(causal)} S={S}")
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 -- one line, go on
                msg = str(e).strip().splitlines()
                emit(kind="error", variant=variant, D=D, causal=causal, S=S,
                     msg=f"{type(e).__name__}: {msg[-1][:200] if msg else ''}")
                ok_variant[variant] = False
                continue
            err_ours = err_lse = 0.0
            for i, (ref, lse64) in enumerate(refs):
                b, h = divmod(i, H)
                err_ours = max(err_ours, (o[b, h].double() - ref).abs().max().item())
                err_lse = max(err_lse, (lse[b, h].double() - lse64).abs().max().item())
            nan = bool(torch.isnan(o).any().item() or torch.isnan(lse).any().item())
            ok = (not nan) and err_ours <= 2 * err_eager + 1e-3 and err_lse <= 1e-3
            ok_variant[variant] &= ok
            emit(kind="check", variant=variant, D=D, causal=causal, S=S, err=err_ours,
                 eager_err=err_eager, lse_err=err_lse, nan=nan, ok=ok)
            del o, lse
        del q, k, v, refs

    # ---- timing: b*s = 16k tokens, hidden 2048 (H = 2048 / D), all providers on the same
    # inputs, interleaved: round r times each provider once (do_bench), the order reversed
    # every other round; a provider's figure is the median over rounds ----
    if not any(ok_variant.values()):
        return
    H = 2048 // D
    rounds, rep = (3, 15) if quick else (5, 30)
    for S in SEQS:
        B = 16384 // S
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt) for _ in range(3))
        flops = kernel_grid.flops(B, H, S, D, causal, "fwd")
        fns, info = {}, {}
        for variant in variants:
            if not ok_variant.get(variant):
                continue
            try:
                launch, _, _ = make_gluon_attention_fwd(q, k, v, causal, None, variant)
                proto_child.guarded_first_call(launch, f"{variant} D={D} causal={int(causal)} S={S} (timing)")
                fns[variant] = launch
                if launch.persistent:
                    info["order"] = f"{gluon_fwd.SCHED_NAMES[launch.sched]}/{launch.grid[0]}"
            except Exception as e:  # noqa: BLE001
                print(f"{variant} failed at S={S}: {type(e).__name__}: "
                      f"{(str(e).strip().splitlines() or [''])[-1][:120]}", flush=True)

        def cudnn(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            cudnn()
            torch.cuda.synchronize()
            fns["cudnn"] = cudnn
        except Exception as e:  # noqa: BLE001
            print(f"cuDNN SDPA failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        times = {name: [] for name in fns}
        for r in range(rounds):
            names = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in names:
                try:
                    times[name].append(triton.testing.do_bench(fns[name], warmup=5, rep=rep))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} timing failed at S={S}: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[-1][:120]}", flush=True)
        res = dict(kind="time", D=D, causal=causal, S=S, B=B, H=H, **info)
        for name, ts in times.items():
            if ts:
                res[name] = flops / statistics.median(ts) * 1e-9
                res[name + "_spread"] = (max(ts) - min(ts)) / statistics.median(ts)
        emit(**res)
        del q, k, v, fns


def run_gpu(budget_s=225.0, per_inst_timeout=75.0, quick=False, variants=VARIANTS):
    """One child process per (D, causal): a compile error, a wrong result or a hang (detected
    in the child by polling a CUDA event, and by the child's timeout here) costs one line and
    the run goes on.  A variant that hung once is not launched again."""
    t_start = time.time()
    insts = [(D, c) for D in HEAD_DIMS for c in (False, True)]
    variants = list(variants)
    rows = []
    queue = list(insts)
    while queue:
        D, causal = queue.pop(0)
        left = budget_s - (time.time() - t_start)
        if left < 10 or not variants:
            print(f"D={D} causal={int(causal)}: SKIPPED ({'time budget spent' if variants else 'no variant left'})")
            continue
        timeout = min(per_inst_timeout, max(25.0, left / (len(queue) + 1) * 1.6), left)
        hung_here = False
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(D), str(int(causal)),
               "--variants", ",".join(variants)] + (["--quick"] if quick else [])
        t0 = time.time()
        results, out, err, rc = proto_child.run(cmd, timeout)
        for res in results:
            if res["kind"] == "check":
                print(f"check {res['variant']:>10} D={D} causal={int(causal)} S={res['S']:>5}: "
                      f"err {res['err']:.2e} (eager fp16 {res['eager_err']:.2e}) "
                      f"lse_err {res['lse_err']:.1e} nan={res['nan']} -> {'PASS' if res['ok'] else 'FAIL'}")
            elif res["kind"] == "error":
                print(f"check {res['variant']:>10} D={D} causal={int(causal)} S={res['S']}: ERROR {res['msg']}")
            elif res["kind"] == "hang":
                print(f"HANG: {res['what']} did not finish in {res['seconds']:.0f}s (mbarrier deadlock?)")
                hung = res["what"].split()[0]
                if hung in variants:
                    variants.remove(hung)
                    hung_here = True
            else:
                rows.append(res)
        proto_child.report_end(D, causal, results, out, err, rc, timeout)
        print(f"  [D={D} c={int(causal)}: {time.time() - t0:.0f}s]", flush=True)
        if hung_here and variants:
            # the child died at the hang: redo this instantiation with the variants left
            queue.insert(0, (D, causal))
    _table(rows)
    print(f"total {time.time() - t_start:.0f}s")


def _table(rows):
    """TF/s per provider (median of rounds) and the ratios behind gluon_fwd.persistent_default."""
    def f(x, w, p=1):
        return f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) and x == x else f"{'-':>{w}}"

    def ratio(a, b):
        return a / b if (a is not None and b) else None
    print(f"\n{'D':>4} {'causal':>6} {'S':>6} {'B':>3} {'tiles':>7} {'persist':>7} {'cuDNN':>7} "
          f"{'t/cuDNN':>7} {'p/cuDNN':>7} {'p/t':>6} {'spread':>6}  order/CTAs   (TF/s)")
    for r in rows:
        t, p, c = r.get("tiles"), r.get("persistent"), r.get("cudnn")
        spread = max((r.get(n + "_spread") or 0.0) for n in ("tiles", "persistent", "cudnn"))
        print(f"{r['D']:>4} {int(r['causal']):>6} {r['S']:>6} {r['B']:>3} {f(t, 7)} {f(p, 7)} {f(c, 7)} "
              f"{f(ratio(t, c), 7, 2)} {f(ratio(p, c), 7, 2)} {f(ratio(p, t), 6, 3)} {f(spread, 6, 3)}  "
              f"{r.get('order', '-')}")
    print("spread: (max - min) / median over the rounds, the worst provider of the row.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--dump", default=None, help="with --compile-only: write PTX/TTGIR here")
    ap.add_argument("--one", nargs=2, type=int, metavar=("D", "CAUSAL"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="fewer check shapes and timing rounds (~150 s on an H100)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole GPU run (default 150 with --quick, else 260)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of " + ", ".join(VARIANTS) + " ('pingpong' = tiles)")
    args = ap.parse_args()
    variants = list(dict.fromkeys(ALIASES.get(v, v) for v in args.variants.split(",") if v))
    assert variants and all(v in VARIANTS for v in variants), variants
    if args.compile_only:
        sys.exit(0 if compile_check(args.dump, variants) else 1)
    if args.one:
        _one_instantiation(args.one[0], bool(args.one[1]), variants, quick=args.quick)
        return
    budget = args.budget if args.budget is not None else (150.0 if args.quick else 260.0)
    run_gpu(budget_s=budget, per_inst_timeout=(55.0 if args.quick else 90.0), quick=args.quick,
            variants=variants)


if __name__ == "__main__":
    main()
