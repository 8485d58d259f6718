"""The Gluon attention backward (ops/gluon_bwd.py, kernels/triton/gluon_bwd.py.tmpl) on an H100
(sm_90): gradients against float64, determinism, the route.

Bar (tests/gpu/test_triton_gpu.py's): our error vs float64 is at most 2x the error of eager
attention computed in the input precision plus 1e-3, for dq, dk and dv.  The float64 reference
is torch autograd through plain attention on the GPU; the eager yardstick is the same code in
fp16 / bf16 (softmax in the input dtype, as test_triton_gpu._eager_lowp).  Rows with no key at
all (bottom-right causal, Sq > Sk) are kept out of the softmax in both (their p is 0), so they
contribute nothing and their reference dq is 0, as the kernel contract says.  No NaN anywhere
(the reference has none).  Deterministic cases (ordered dQ turns, every head dim; d256 hands
dQ to the writer in two column halves) call gluon_bwd.backward directly (the route takes the
turns only from 16k keys).  Compile cost dominates the run: the cases share about 11
instantiations (head dim x causal x dtype x deterministic).

Run: python -m pytest -m gpu -x -q tests/gpu/test_gluon_bwd_gpu.py
"""
import os
import sys

import pytest
import torch

from fa3_inductor.spec import AttentionSpec

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_triton_gpu import _err, _gluon_inputs, _grads, _gluon_spy  # noqa: E402  (shared helpers)

from fa3_inductor import reference  # noqa: E402
from fa3_inductor.ops import gluon_bwd, triton_impl  # noqa: E402  (imports triton)

DEV = "cuda"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _spec(align, dt, det=None):
    return AttentionSpec(window_right=None if align == "none" else 0,
                         align="bottom_right" if align == "br" else "top_left",
                         out_dtype={"fp16": "float16", "bf16": "bfloat16"}[dt], deterministic_backward=det)


def _attn(q, k, v, causal, bottom_right, scale):
    """Plain attention in q's dtype (GQA "div" by expanding K/V): (out, lse).  Rows that see no
    key (bottom-right causal, Sq > Sk) get p = 0: out 0, lse -inf, no NaN in the gradients."""
    Hq, Sq, Sk = q.shape[1], q.shape[2], k.shape[2]
    kx, vx = reference.expand_kv(k, Hq, "div"), reference.expand_kv(v, Hq, "div")
    s = torch.matmul(q, kx.transpose(-1, -2)) * scale
    if causal:
        off = (Sk - Sq) if bottom_right else 0
        keep = torch.arange(Sk, device=q.device).view(1, -1) <= torch.arange(Sq, device=q.device).view(-1, 1) + off
        s = s.masked_fill(~keep, float("-inf"))
        alive = keep.any(-1).view(1, 1, Sq, 1)
        lse = torch.logsumexp(s.detach().double(), -1)
        p = torch.softmax(torch.where(alive, s, torch.zeros((), dtype=s.dtype, device=s.device)), -1) * alive
    else:
        lse = torch.logsumexp(s.detach().double(), -1)
        p = torch.softmax(s, -1)
    return torch.matmul(p.to(vx.dtype), vx), lse


def _bwd_spy(monkeypatch):
    """The Gluon backward's calls, each as its `deterministic` argument (the route is asserted,
    not assumed)."""
    calls = []
    real = gluon_bwd.backward
    monkeypatch.setattr(gluon_bwd, "backward",
                        lambda *a, **kw: calls.append(bool(a[8] if len(a) > 8 else kw["deterministic"])) or real(*a, **kw))
    return calls


def _problem(D, dt, align, shape, transposed, seed):
    """q, k, v (maybe [B, S, H, D].transpose(1, 2) views), out and lse from the float64
    reference (out rounded to the input dtype, in q's layout), dout in q's layout, and the
    float64 reference gradients by autograd."""
    B, Hq, Hk, Sq, Sk = shape
    dtype = DTYPES[dt]
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, dtype, transposed, seed)
    scale = D ** -0.5
    causal, br = align != "none", align == "br"
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    dout = torch.randn(B, Sq, Hq, D, device=DEV, dtype=dtype, generator=g).transpose(1, 2) if transposed \
        else torch.randn(B, Hq, Sq, D, device=DEV, dtype=dtype, generator=g)
    (out64, lse64), ref = _grads64(q, k, v, dout, causal, br, scale)
    out = torch.empty_like(q)          # q's layout ([B, S, H, D].transpose(1, 2) when transposed)
    out.copy_(out64)
    lse = lse64.float().contiguous()
    return q, k, v, dout, out, lse, scale, ref, lse64


def _grads64(q, k, v, dout, causal, br, scale):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out, lse = _attn(*leaves, causal, br, scale)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return (out.detach(), lse), grads


def _check(label, got, ref, q, k, v, dout, causal, br, scale, lse64, extra=""):
    """Our dq/dk/dv against float64 under the bar; one assertion listing all three."""
    _, eager = _grads(lambda a, b, c: _attn(a, b, c, causal, br, scale)[0], (q, k, v), dout)
    lines, ok = [], True
    for name, g, r, e in zip(("dq", "dk", "dv"), got, ref, eager):
        assert g.shape == r.shape and g.dtype == q.dtype, (name, g.shape, g.dtype)
        nan = int(torch.isnan(g).sum() + torch.isinf(g).sum())
        e_ours, e_eager = _err(g, r), _err(e, r)
        good = nan == 0 and e_ours <= 2 * e_eager + 1e-3
        where = ""
        if not good and nan == 0:
            idx = (g.double() - r).abs().flatten().argmax().item()
            where = f" worst at {[int(x) for x in torch.unravel_index(torch.tensor(idx), g.shape)]}"
        ok &= good
        lines.append(f"{name}: err {e_ours:.3e} eager {e_eager:.3e} |ref| {r.abs().max().item():.2e} "
                     f"nan/inf {nan}{where}")
    dead = torch.isneginf(lse64)
    if dead.any():
        zero = bool((got[0][dead] == 0).all())
        ok &= zero
        lines.append(f"dead rows {int(dead.sum())}: dq exactly 0: {zero}")
    assert ok, f"{label}{extra}\n  " + "\n  ".join(lines)


_CASES = [  # D, dtype, align, (B, Hq, Hk, Sq, Sk), transposed, deterministic
    (128, "fp16", "none", (2, 4, 4, 1, 1), False, True),
    (128, "fp16", "none", (1, 8, 2, 17, 17), True, True),
    (128, "fp16", "none", (1, 2, 2, 4097, 4097), False, True),
    (128, "fp16", "tl", (1, 8, 1, 113, 1000), False, True),    # GQA 8:1; key blocks no query sees
    (128, "fp16", "tl", (1, 4, 4, 1000, 113), True, True),     # Sq > Sk
    (128, "fp16", "br", (1, 8, 2, 113, 1000), False, True),
    (128, "fp16", "br", (2, 4, 4, 1000, 113), False, True),    # rows with no key: dq 0
    (128, "fp16", "br", (2, 4, 4, 17, 1), True, False),        # one key, non-deterministic
    (128, "fp16", "tl", (2, 8, 2, 1000, 1000), True, False),   # GQA 4:1, non-deterministic
    (128, "bf16", "none", (2, 4, 4, 113, 4097), True, True),
    (128, "bf16", "tl", (1, 4, 1, 1000, 1000), False, True),
    (128, "bf16", "br", (1, 8, 2, 1, 17), False, True),
    (256, "fp16", "none", (1, 4, 4, 113, 113), False, False),
    (256, "fp16", "tl", (2, 4, 2, 1000, 1000), True, True),
    (256, "fp16", "br", (1, 4, 4, 4097, 1000), False, True),   # long, 3097 dead rows per head
    (256, "bf16", "br", (1, 8, 8, 1000, 113), True, True),
    (256, "bf16", "tl", (1, 2, 2, 1, 1), False, True),
    (256, "bf16", "br", (1, 8, 1, 17, 1000), False, True),     # GQA 8:1
    (256, "fp16", "tl", (2, 4, 2, 1000, 1000), True, False),   # the atomic mode of the same cases
    (256, "bf16", "br", (1, 8, 8, 1000, 113), True, False),
    (64, "fp16", "tl", (1, 4, 2, 1000, 1000), False, True),
    (64, "fp16", "br", (2, 4, 1, 113, 1000), True, True),      # GQA 4:1
]


@pytest.mark.parametrize("D,dt,align,shape,transposed,det", _CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_gluon_backward(D, dt, align, shape, transposed, det, monkeypatch):
    """Against float64 autograd (the module's bar).  Non-deterministic: through
    triton_impl.backward's Gluon route.  Deterministic (ordered dQ turns, gluon_bwd.backward
    directly): every head dim (d256: the turn waited for before the tile's lo half, passed
    after its hi half)."""
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, dt, align, shape, transposed, seed=sum(shape) + D)
    assert not det or D in gluon_bwd.DETERMINISTIC_HEAD_DIMS
    spec = _spec(align, dt, det)
    if det:   # the turns mode, asked for directly (the route takes it only where it measured faster)
        got = gluon_bwd.backward(dout, q, k, v, out, lse, scale, spec, True)
    else:
        why = triton_impl.gluon_bwd_supports(dout, q, k, v, out, lse, None, None, None, None, spec, False, scale=scale)
        assert why is None, why
        calls = _bwd_spy(monkeypatch)
        got = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)
        assert calls == [False], "the Gluon backward did not run in the asked mode"
        assert got[3].numel() == 0
    B, Hq, Hk, Sq, Sk = shape
    n_kv = -(-Sk // gluon_bwd.CONFIGS[D][1])
    _check(f"D={D} {dt} {align} {shape} transposed={transposed} deterministic={det}", got[:3], ref, q, k, v,
           dout, align != "none", align == "br", scale, lse64, extra=f" ({n_kv} key blocks x {B * Hk} kv heads)")


@pytest.mark.parametrize("D,align", [(128, "br"), (64, "none")])
def test_many_more_ctas_than_sms(D, align):
    """Deterministic, a grid of 2048 CTAs (16 waves on 132 SMs): 64 key blocks x 32 kv heads,
    GQA 2:1, Sq = 512 < Sk = 8192, so up to 64 ranks add into one query block (bottom-right:
    the first ~60 key blocks all see query block 0).  Exercises the turn chain's dispatch-order
    argument (a CTA waits only on lower key blocks of its kv head, dispatched before it) across
    many waves: a violation hangs (run under a timeout) or breaks the numbers."""
    shape = (1, 64, 32, 512, 8192)
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, "fp16", align, shape, False, seed=3)
    launch, dq, dk, dv = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, align != "none", align == "br", True)
    assert launch.grid == (8192 // gluon_bwd.CONFIGS[D][1], 32) and launch.grid[0] * launch.grid[1] == 2048
    launch()
    torch.cuda.synchronize()
    _check(f"D={D} {align} {shape} grid {launch.grid}", (dq, dk, dv), ref, q, k, v, dout, align != "none",
           align == "br", scale, lse64)


@pytest.mark.parametrize("D,align", [(128, "none"), (128, "tl"), (128, "br"), (64, "br"), (256, "none"),
                                     (256, "br")])
def test_deterministic_is_bit_identical_and_matches_atomic(D, align):
    """The kernel's deterministic mode: three runs give bit-identical dq, dk, dv.  The shape
    gives many key blocks per head (4096 keys: 32 key blocks, d256 64, so up to 32 / 64 ranks
    per query block) and GQA 2:1; the causal variants (top-left, and bottom-right with Sq < Sk, where
    the ranks start mid-sequence) exercise prefix chains of different lengths.  The
    non-deterministic run (the same tiles, added in any order) agrees up to summation order."""
    Sq = 4096 if align != "br" else 3000
    shape = (2, 16, 8, Sq, 4096)
    B, Hq, Hk, Sq, Sk = shape
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, torch.float16, True, seed=11)
    dout = torch.randn(B, Hq, Sq, D, device=DEV, dtype=torch.float16)
    spec = _spec(align, "fp16")
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, D ** -0.5, spec)
    launch, *_ = gluon_bwd.prepare(dout, q, k, v, out, lse, D ** -0.5, align != "none", align == "br", True)
    assert launch.grid == (Sk // gluon_bwd.CONFIGS[D][1], B * Hk), launch.grid
    runs = [gluon_bwd.backward(dout, q, k, v, out, lse, D ** -0.5, spec, True)[:3] for _ in range(3)]
    for run in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], run):
            assert not torch.isnan(a).any(), name
            assert torch.equal(a, b), f"{name} differs between deterministic runs: {(a.float() - b.float()).abs().max()}"
    atomic = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, D ** -0.5,
                                  spec.replace(deterministic_backward=False), False)[:3]
    for name, a, b in zip(("dq", "dk", "dv"), runs[0], atomic):
        mag = a.abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 1e-2 * mag + 1e-3, name


@pytest.mark.parametrize("align,shape,chains", [("tl", (1, 4, 2, 17, 1000), None), ("br", (2, 4, 4, 1000, 113), None),
                                                ("tl", (1, 4, 2, 17, 1000), 3), ("br", (2, 4, 4, 1000, 300), 2)])
def test_writes_every_row(align, shape, chains):
    """Outputs and the fp32 dQ buffers poisoned with NaN before the launch (deterministic: the
    buffers are not zeroed, the first rank of a chain stores): every dq / dk / dv row is
    written, keys no query sees (top-left, Sk > Sq) get dk = dv = 0 exactly, rows with no key
    get dq = 0, and the finish reads no chain tile that nobody wrote (top-left with 17 queries:
    only key block 0 adds, so chains 1 and 2 stay unwritten; bottom-right with Sq > Sk: query
    blocks no key block reaches)."""
    D = 128
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, "fp16", align, shape, False, seed=5)
    launch, dq, dk, dv = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, True, align == "br", True,
                                           chains=chains)
    for t in (dq, dk, dv, launch.dq_acc):
        t.fill_(float("nan"))
    launch()
    torch.cuda.synchronize()
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name}: rows left unwritten"
    if align == "tl":
        Sq = shape[3]
        assert (dk[:, :, Sq:] == 0).all() and (dv[:, :, Sq:] == 0).all()
    _check(f"{align} {shape}", (dq, dk, dv), ref, q, k, v, dout, True, align == "br", scale, lse64)


def test_gluon_forward_and_backward_through_op(monkeypatch):
    """torch autograd through fa3::attention_fwd with kernel="triton": the forward runs on Gluon,
    the backward on Gluon too (spies on both), transposed GQA inputs, bottom-right causal; the
    gradients meet the bar against float64."""
    from fa3_inductor.ops import attention_op
    D, dt = 128, "bf16"
    spec = _spec("br", dt, det=False).replace(kernel="triton")   # the routed (atomic dQ) mode
    B, Hq, Hk, Sq, Sk = 2, 8, 2, 300, 700
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, DTYPES[dt], True, seed=D)
    scale = D ** -0.5
    fwd_calls, bwd_calls = _gluon_spy(monkeypatch), _bwd_spy(monkeypatch)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = attention_op.attention(*leaves, scale=scale, spec=spec.to_json())
    assert fwd_calls == [1], "the Gluon forward did not run"
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    assert len(bwd_calls) == 1, "the Gluon backward did not run"
    (_, lse64), ref = _grads64(q, k, v, dout, True, True, scale)
    _check("through the op", got, ref, q, k, v, dout, True, True, scale, lse64)


def test_deterministic_route_long_non_causal(monkeypatch):
    """The default (deterministic) backward of a non-causal call with 16k keys at d128 takes the
    Gluon turns (triton_impl.deterministic_tl_reason); gradients meet the bar."""
    D, dt, shape = 128, "fp16", (1, 2, 2, 130, 16384)
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, dt, "none", shape, False, seed=3)
    spec = _spec("none", dt)
    assert triton_impl.deterministic_backward(spec) is True
    calls = _bwd_spy(monkeypatch)
    got = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)
    assert calls == [True], calls
    _check(f"deterministic route {shape}", got[:3], ref, q, k, v, dout, False, False, scale, lse64)


@pytest.mark.parametrize("D,align,chains", [(128, "none", 2), (128, "br", 3), (64, "tl", 4), (128, "tl", 8),
                                            (256, "br", 2), (256, "none", 3)])
def test_deterministic_chains(D, align, chains):
    """Deterministic dQ with several chains (key block n into buffer n % chains, rank n //
    chains; the finish sums the buffers in order): gradients meet the bar, two runs are
    bit-identical, and a 2048-CTA grid (16 waves) finishes (a rank waiting on a CTA that is not
    dispatched would hang: run under a timeout)."""
    shape = (2, 8, 4, 1000 if align != "br" else 700, 2000)
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, "fp16", align, shape, True, seed=5)
    launch, dq, dk, dv = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, align != "none", align == "br", True,
                                           chains=chains)
    assert launch.chains == chains
    launch()
    first = [t.clone() for t in (dq, dk, dv)]
    launch()
    torch.cuda.synchronize()
    for name, a, b in zip(("dq", "dk", "dv"), first, (dq, dk, dv)):
        assert torch.equal(a, b), f"{name} differs between runs with {chains} chains"
    _check(f"D={D} {align} {shape} chains={chains}", (dq, dk, dv), ref, q, k, v, dout, align != "none",
           align == "br", scale, lse64)
    big = (1, 64, 32, 512, 8192)
    q, k, v, dout, out, lse, scale, ref, lse64 = _problem(D, "fp16", align, big, False, seed=3)
    launch, dq, dk, dv = gluon_bwd.prepare(dout, q, k, v, out, lse, scale, align != "none", align == "br", True,
                                           chains=chains)
    launch()
    torch.cuda.synchronize()
    _check(f"D={D} {align} {big} chains={chains}", (dq, dk, dv), ref, q, k, v, dout, align != "none",
           align == "br", scale, lse64)
