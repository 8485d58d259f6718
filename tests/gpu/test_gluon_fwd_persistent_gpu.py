"""The persistent Gluon forward (ops/gluon_fwd.prepare(persistent=True), PERSISTENT in
kernels/triton/gluon_fwd.py.tmpl) on an H100 (sm_90): outputs and LSE against float64.

Bar (tests/gpu/test_triton_gpu.py's, its helpers): max |out - ref64| <= 2 * max |eager_lowp -
ref64| + 1e-3; lse exactly -inf on rows with no key (bottom-right causal, Sq > Sk, where out
must be 0) and within 1e-3 elsewhere; no NaN.  The shapes are the odd ones of the tile-grid
tests (lengths 1, 17, 113, 1000, 4097, Sq != Sk both ways, GQA 4:1, [B, S, H, D] transposed
inputs, bottom-right causal), with grids smaller than the tile count so that every CTA loops
(barrier phases, ring slots and turn parities carried across tiles), and each tile order
forced at least once.  A deadlock would never return: launches are polled with a timeout and
the run is ended (os._exit) rather than left hanging.

Run: python -m pytest -m gpu -x -q tests/gpu/test_gluon_fwd_persistent_gpu.py
"""
import os
import sys
import time

import pytest
import torch

from fa3_inductor.spec import AttentionSpec

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_triton_gpu import _err, _gluon_inputs, _gluon_spy, check_plain_forward  # noqa: E402  (shared helpers)

from fa3_inductor.ops import gluon_fwd, triton_impl  # noqa: E402  (imports triton)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
HEAD, PAIRS, LPT = gluon_fwd.SCHED_HEAD, gluon_fwd.SCHED_PAIRS, gluon_fwd.SCHED_LPT
HANG_S = 30.0


def _guarded(launch, what):
    """launch(), then poll a CUDA event: an mbarrier deadlock never completes, and a stuck
    context would hang every later test, so report and end the process."""
    launch()
    ev = torch.cuda.Event()
    ev.record()
    t0 = time.time()
    while not ev.query():
        if time.time() - t0 > HANG_S:
            print(f"\nHANG: persistent Gluon forward {what} did not finish in {HANG_S:.0f}s "
                  "(mbarrier deadlock?)", flush=True)
            os._exit(3)
        time.sleep(0.002)


def _spec(align, dt):
    return AttentionSpec(window_right=None if align == "none" else 0,
                         align="bottom_right" if align == "br" else "top_left",
                         out_dtype={"fp16": "float16", "bf16": "bfloat16"}[dt])


def _check(q, k, v, spec, scale, out, lse):
    check_plain_forward(q, k, v, spec, scale, out, lse)


_CASES = [  # D, dtype, causal, (B, Hq, Hk, Sq, Sk), transposed, CTAs (None: SMs), order (None: chosen)
    (128, "fp16", "none", (2, 4, 4, 1, 1), False, None, None),
    (128, "fp16", "none", (1, 8, 2, 17, 17), True, 3, None),        # GQA 4:1, transposed
    (128, "fp16", "none", (1, 2, 2, 4097, 4097), False, 7, None),   # 66 tiles on 7 CTAs
    (128, "fp16", "tl", (1, 8, 2, 113, 1000), False, None, None),
    (128, "fp16", "tl", (1, 4, 4, 1000, 113), True, 5, PAIRS),
    (128, "fp16", "br", (1, 8, 2, 113, 1000), False, 2, LPT),
    (128, "fp16", "br", (2, 4, 4, 1000, 113), False, 3, PAIRS),     # rows with no key: out 0, lse -inf
    (128, "fp16", "br", (2, 4, 4, 17, 1), True, None, None),
    (128, "bf16", "none", (2, 4, 4, 1000, 4097), True, 11, None),
    (128, "bf16", "tl", (1, 4, 1, 4097, 4097), False, 13, LPT),
    (128, "bf16", "tl", (2, 8, 2, 4097, 4097), False, None, PAIRS),  # 33 query tiles: pair holes
    (128, "bf16", "tl", (1, 4, 4, 1000, 1000), False, 4, HEAD),
    (128, "bf16", "br", (1, 8, 2, 1, 17), False, None, None),
    (256, "fp16", "none", (1, 4, 4, 113, 113), False, 1, None),     # one CTA runs every tile
    (256, "fp16", "tl", (2, 4, 2, 1000, 1000), True, 6, PAIRS),
    (256, "fp16", "br", (1, 4, 4, 4097, 1000), False, 9, LPT),
    (256, "bf16", "none", (1, 8, 1, 17, 4097), False, 4, None),
    (256, "bf16", "tl", (1, 2, 2, 1, 1), False, None, None),
    (256, "bf16", "br", (1, 8, 8, 1000, 4097), True, 10, PAIRS),
    (256, "bf16", "tl", (2, 4, 1, 2000, 2000), False, 132, LPT),
]


@pytest.mark.parametrize("D,dt,causal,shape,transposed,ctas,sched", _CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_persistent_forward(D, dt, causal, shape, transposed, ctas, sched):
    B, Hq, Hk, Sq, Sk = shape
    dtype = DTYPES[dt]
    spec = _spec(causal, dt)
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, dtype, transposed, seed=Sq * 7 + Sk + D + 1)
    scale = D ** -0.5
    assert triton_impl.gluon_supports(q, k, v, None, None, None, None, spec, scale=scale) is None
    launch, out, lse = gluon_fwd.prepare(q, k, v, scale, spec.causal, spec.align == "bottom_right",
                                         persistent=True, num_ctas=ctas, sched=sched)
    assert launch.persistent and len(launch.grid) == 1
    _guarded(launch, f"D={D} {dt} {causal} {shape} ctas={ctas} sched={sched}")
    _check(q, k, v, spec, scale, out, lse)


@pytest.mark.parametrize("D,causal,sched", [(128, "tl", PAIRS), (128, "none", HEAD), (256, "br", LPT)])
def test_persistent_many_tiles_per_cta(D, causal, sched):
    """Two CTAs run 128 tiles each (16 per head, 16 heads, GQA 4:1): hundreds of phase flips of
    every barrier and ring slot, and a launch repeated on the same buffers gives the same bits."""
    B, Hq, Hk, S = 2, 8, 2, 2000
    spec = _spec(causal, "fp16")
    q, k, v = _gluon_inputs(B, Hq, Hk, S, S, D, torch.float16, False, seed=D + S)
    launch, out, lse = gluon_fwd.prepare(q, k, v, D ** -0.5, spec.causal, spec.align == "bottom_right",
                                         persistent=True, num_ctas=2, sched=sched)
    _guarded(launch, f"D={D} {causal} 2 CTAs")
    _check(q, k, v, spec, D ** -0.5, out, lse)
    first, first_lse = out.clone(), lse.clone()
    _guarded(launch, f"D={D} {causal} 2 CTAs, again")
    assert torch.equal(out, first) and torch.equal(lse, first_lse)


@pytest.mark.parametrize("D,Sq,causal,ctas", [(128, 17, True, 1), (128, 1000, False, 3),
                                              (256, 113, True, 2), (256, 4097, False, 5)])
def test_persistent_writes_only_its_rows(D, Sq, causal, ctas):
    """Poisoned (NaN) outputs: out a view [B, H, :Sq] of a taller buffer, so a partial query tile
    storing past Sq (the register stores of O are masked by hand) would land in the poisoned
    rows; every row of out and lse is written; the values agree with the tile grid's kernel
    (the same arithmetic per tile: equal up to an ulp)."""
    B, H = 2, 3
    q, k, v = _gluon_inputs(B, H, H, Sq, Sq, D, torch.float16, False, seed=Sq + D)
    big = torch.full((B, H, Sq + 128, D), float("nan"), device="cuda", dtype=torch.float16)
    lse_buf = torch.full((B, H, Sq), float("nan"), device="cuda")
    launch, out, lse = gluon_fwd.prepare(q, k, v, D ** -0.5, causal, False, out=big[:, :, :Sq], lse=lse_buf,
                                         persistent=True, num_ctas=ctas)
    _guarded(launch, f"D={D} Sq={Sq} poisoned")
    assert torch.isnan(big[:, :, Sq:]).all(), "rows past Sq were written"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_launch, want, want_lse = gluon_fwd.prepare(q, k, v, D ** -0.5, causal, False, persistent=False)
    _guarded(ref_launch, f"D={D} Sq={Sq} tile grid")
    assert _err(out, want) <= 2e-3 and _err(lse, want_lse) <= 1e-5


def test_persistent_default_switch_routes_the_op(monkeypatch):
    """persistent_default() deciding True sends triton_impl.forward's Gluon route through the
    persistent kernel (the measured rule's switch)."""
    monkeypatch.setattr(gluon_fwd, "persistent_default", lambda causal, Sq: True)
    seen = []

    class Spy(gluon_fwd.FwdPlan):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self.persistent)
    monkeypatch.setattr(gluon_fwd, "FwdPlan", Spy)
    calls = _gluon_spy(monkeypatch)
    spec = _spec("br", "bf16")
    q, k, v = _gluon_inputs(1, 8, 2, 1000, 700, 128, torch.bfloat16, True, seed=5)
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, 128 ** -0.5, spec)
    torch.cuda.synchronize()
    assert calls == [1] and seen == [True]
    _check(q, k, v, spec, 128 ** -0.5, out, lse)
