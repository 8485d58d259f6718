"""Measure every Triton tile candidate (codegen/triton_configs.py: fwd_candidates, bwd_candidates)
on the H100 at the benchmark's shapes, next to cuDNN from the same run; the winners fill the
tuned tables in triton_configs.py.

    python scripts/tune_triton.py [--dims 64,128,256] [--seqlens 4096] [--kinds fwd,bwd] [--jobs 8] [--json F]
    python scripts/tune_triton.py --list ...   # the jobs that would run (no GPU needed)
    python scripts/tune_triton.py --kinds bwd --only fused   # default + one-launch backward variants
    python scripts/tune_triton.py --kinds bwd --only tma     # default (pointer loads) + the TMA-descriptor
                                                 # backward variants (BwdConfig.tma, key suffix _tma)
    python scripts/tune_triton.py --kinds bwd --only default --noeven   # default, with and without
                                                 # the even-length specialisation (key suffix _noeven)

fp16, batch*seqlen = 16k, hidden 2048 (heads = 2048 / d).  Compiles happen first in --jobs
worker processes (each runs every config of its share once at the real shape, so Triton's
on-disk cache holds exactly the binaries the timing process launches); timing is then one
process, triton.testing.do_bench medians.  TFLOP/s: forward 4*b*h*s*s*d (half when causal),
backward 2.5x the forward's FLOPs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from fa3_inductor.codegen import triton_configs  # noqa: E402
from fa3_inductor.ops import triton_impl  # noqa: E402
from fa3_inductor.spec import AttentionSpec  # noqa: E402


KINDS = ("fwd", "bwd")


def _shape(d, s, total=16384, hidden=2048):
    return max(1, total // s), hidden // d, s, d


def _inputs(d, s, causal, need_grad=False):
    B, H, S, D = _shape(d, s)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    return q, k, v, AttentionSpec(window_right=0 if causal else None), D ** -0.5


def _run(kind, d, s, causal, cfg, even=True):
    q, k, v, spec, scale = _inputs(d, s, causal)
    if kind == "fwd":
        fn = lambda: triton_impl.forward(q, k, v, None, None, None, None, scale, spec, config=cfg)  # noqa: E731
    else:
        out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
        dout = torch.randn_like(out)
        fn = lambda: triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec,  # noqa: E731
                                          False, config=cfg)
    if even:
        return fn

    def noeven():
        # The bound-checked kernels at the same (even) shape: the specialisation's A/B.
        with triton_configs.no_even_specialisation():
            return fn()
    return noeven


def _cells(dims, seqlens):
    for d in dims:
        for causal in (False, True):
            for s in seqlens:
                yield d, causal, s


_ONLY = []   # --only: key substrings; the table's default config always stays (the baseline)
_EVENS = [True]   # --noeven adds False: every candidate also timed with the specialisation off


def _candidates(kind, d, causal):
    cands = (triton_configs.fwd_candidates if kind == "fwd" else triton_configs.bwd_candidates)(d, d, causal)
    return [c for i, c in enumerate(cands) if i == 0 or not _ONLY or any(o in c.key() for o in _ONLY)]


def _variants(kind, d, causal):
    """(cfg, even) pairs to measure: each candidate, and with --noeven also its bound-checked run."""
    return [(c, e) for c in _candidates(kind, d, causal) for e in _EVENS]


def _variant_key(cfg, even):
    return cfg.key() + ("" if even else "_noeven")


def _jobs(dims, seqlens, kinds=KINDS):
    out = []
    for d, causal, s in _cells(dims, seqlens):
        for kind in kinds:
            out += [(kind, d, s, causal, c, e) for c, e in _variants(kind, d, causal)]
    return out


def _warm_worker(index: int, count: int, dims, seqlens, kinds, path: str):
    """Worker process: compile (by running once) its share of the jobs, logging each start and
    end to `path`, so a config that hangs or crashes is named and skipped by the timing pass."""
    jobs = _jobs(dims, seqlens, kinds)[index::count]
    with open(path, "w", buffering=1) as f:
        for job in jobs:
            key = _job_key(job)
            f.write(f"start {key}\n")
            t = time.time()
            try:
                _run(*job)()
                torch.cuda.synchronize()
                f.write(f"ok {key} {time.time() - t:.1f}s\n")
            except Exception as exc:  # out of resources / compile failure: reported, skipped
                f.write(f"bad {key} {str(exc).splitlines()[0][:160]}\n")


def _job_key(job):
    kind, d, s, causal, cfg, even = job
    return f"{kind}:d{d}:s{s}:c{int(causal)}:{_variant_key(cfg, even)}"


def _warm(dims, seqlens, kinds, jobs_n: int, deadline_s: float, workdir: str):
    """Run the workers (separate processes, shared Triton disk cache) until done or the deadline;
    returns the set of job keys that compiled and ran, and a list of problems."""
    import os
    import subprocess
    procs, paths = [], []
    for i in range(jobs_n):
        path = os.path.join(workdir, f"warm_{i}.log")
        paths.append(path)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", f"{i}/{jobs_n}", "--dims",
                                       ",".join(map(str, dims)), "--seqlens", ",".join(map(str, seqlens)),
                                       "--kinds", ",".join(kinds), "--only", ",".join(_ONLY),
                                       "--worker-log", path] + ([] if _EVENS == [True] else ["--noeven"])))
    t0 = time.time()
    while time.time() - t0 < deadline_s and any(p.poll() is None for p in procs):
        time.sleep(1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    ok, problems = set(), []
    for path in paths:
        started = None
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "start":
                started = rest
            elif word == "ok":
                ok.add(rest.split(" ")[0])
                started = None
            elif word == "bad":
                problems.append("failed: " + rest)
                started = None
        if started:
            problems.append(f"hung or killed at the deadline: {started}")
    return ok, problems


def _cudnn(d, s, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from triton.testing import do_bench
    q, k, v, _, scale = _inputs(d, s, causal)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    res = {}
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            res["fwd"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            dout = torch.randn_like(out)
            res["bwd"] = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    except Exception as exc:
        res["error"] = str(exc).splitlines()[0][:120]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--seqlens", default="4096")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--kinds", default="fwd,bwd", help="fwd, bwd or both (bwd alone saves device time)")
    ap.add_argument("--list", action="store_true", help="print the jobs and exit (no GPU needed)")
    ap.add_argument("--only", default="", help="comma-separated substrings of config keys to keep "
                    "(e.g. 'fused'); the table's default always runs too, as the baseline "
                    "('--only default': the default alone)")
    ap.add_argument("--noeven", action="store_true", help="also time every config with the even-length "
                    "specialisation off (EVEN_M/EVEN_N false: bound checks kept), key suffix _noeven")
    ap.add_argument("--json", default=None)
    ap.add_argument("--warm-s", type=float, default=150.0, help="deadline of the compile phase")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-log", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dims = [int(x) for x in args.dims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    kinds = [k for k in KINDS if k in args.kinds.split(",")]
    _ONLY[:] = [o for o in args.only.split(",") if o]
    _EVENS[:] = [True, False] if args.noeven else [True]
    if args.list:
        for job in _jobs(dims, seqlens, kinds):
            print(_job_key(job))
        return 0
    if args.worker:
        i, n = (int(x) for x in args.worker.split("/"))
        _warm_worker(i, n, dims, seqlens, kinds, args.worker_log)
        return 0
    import tempfile
    from triton.testing import do_bench
    t0 = time.time()
    ok, problems = _warm(dims, seqlens, kinds, args.jobs, args.warm_s, tempfile.mkdtemp())
    print(f"compiled {len(ok)} of {len(_jobs(dims, seqlens, kinds))} configs in {time.time() - t0:.0f}s", flush=True)
    for b in problems:
        print("  " + b, flush=True)
    results = []
    for d, causal, s in _cells(dims, seqlens):
        B, H, S, D = _shape(d, s)
        fl = 4.0 * B * H * S * S * D / (2 if causal else 1)
        ref = _cudnn(d, s, causal)
        cell = dict(d=d, causal=causal, seqlen=s, cudnn_fwd=fl / ref["fwd"] / 1e9 if "fwd" in ref else None,
                    cudnn_bwd=2.5 * fl / ref["bwd"] / 1e9 if "bwd" in ref else None, fwd=[], bwd=[])
        for kind in kinds:
            for cfg, even in _variants(kind, d, causal):
                name = _variant_key(cfg, even)
                if _job_key((kind, d, s, causal, cfg, even)) not in ok:
                    cell[kind].append(dict(cfg=name, error="not compiled in the warm phase"))
                    continue
                try:
                    ms = do_bench(_run(kind, d, s, causal, cfg, even))
                except Exception as exc:
                    cell[kind].append(dict(cfg=name, error=str(exc).splitlines()[0][:100]))
                    continue
                cell[kind].append(dict(cfg=name, ms=ms, tflops=(fl if kind == "fwd" else 2.5 * fl) / ms / 1e9))
            cell[kind].sort(key=lambda r: r.get("ms", 1e9))
        results.append(cell)
        _print_cell(cell)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n== best per cell (TFLOP/s, ratio to cuDNN)")
    for c in results:
        line = f"d{c['d']:3d} {'causal' if c['causal'] else 'full  '} s{c['seqlen']:5d}"
        for kind in kinds:
            best = c[kind][0]
            line += (f"  |  {kind} {best.get('tflops', 0):5.0f} ({_ratio(best, c['cudnn_' + kind])}) {best['cfg']}"
                     f", default {_default(c, kind)}")
        print(line)
    return 0


def _ratio(r, ref):
    return f"{r['tflops'] / ref:.2f}x" if ref and "tflops" in r else "-"


def _default(c, kind):
    d, causal = c["d"], c["causal"]
    key = (triton_configs.default_fwd(d, d, causal) if kind == "fwd" else triton_configs.default_bwd(d, d, causal)).key()
    for r in c[kind]:
        if r["cfg"] == key:
            return f"{r.get('tflops', 0):.0f}"
    return "?"


def _print_cell(c):
    print(f"\n-- d{c['d']} {'causal' if c['causal'] else 'non-causal'} s{c['seqlen']}: cuDNN fwd "
          f"{c['cudnn_fwd'] or 0:.0f} bwd {c['cudnn_bwd'] or 0:.0f} TFLOP/s", flush=True)
    for kind in ("fwd", "bwd"):
        for r in c[kind]:   # empty for a kind not asked for
            print(f"   {kind} {r['cfg']:42s} " + (f"{r['tflops']:6.0f}" if "tflops" in r else f"ERR {r['error']}"))


if __name__ == "__main__":
    sys.exit(main())
