"""Launch plans (ops/fast_launch.py, gluon_fwd.FwdPlan, gluon_bwd.BwdPlan) on an H100: after
the first call of a signature the Gluon kernels launch without the JIT, and what they compute
is bit-identical to a JIT launch of the same inputs (the same compiled kernel), for new data,
new output buffers and every kernel of the backward; launch hooks send launches back through
the JIT.

Run: python -m pytest -m gpu -q tests/gpu/test_fast_launch_gpu.py
"""
import pytest
import torch

from fa3_inductor.spec import AttentionSpec

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)

from fa3_inductor.ops import gluon_bwd, gluon_fwd, triton_impl  # noqa: E402  (imports triton)

DEV = "cuda"


def _count_jit(monkeypatch, fn):
    """Calls of a JIT function's run() (the JIT launch path)."""
    calls = []
    real = fn.run
    monkeypatch.setattr(fn, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _qkv(B, Hq, Hk, Sq, Sk, D, seed, dtype=torch.float16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, device=DEV, dtype=dtype, generator=g)
                 for h, s in ((Hq, Sq), (Hk, Sk), (Hk, Sk)))


def _ref(q, k, v, scale, causal):
    """float64 attention, GQA "div", top-left causal (Sq == Sk here)."""
    g = q.shape[1] // k.shape[1]
    kx, vx = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = q.double() @ kx.transpose(-1, -2) * scale
    if causal:
        Sq, Sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(Sq, Sk, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ vx


# (D, causal, Sq): d128 causal 2048 takes the persistent grid, the others one CTA per tile
@pytest.mark.parametrize("D,causal,Sq", [(128, True, 2048), (128, False, 1000), (256, False, 113)])
def test_forward_launches_directly_after_the_first_call(monkeypatch, D, causal, Sq):
    spec = AttentionSpec(window_right=0 if causal else None)
    scale = D ** -0.5
    jit = _count_jit(monkeypatch, gluon_fwd.kernel_module().attn_fwd_kernel)
    first = _qkv(2, 8, 2, Sq, Sq, D, seed=1)
    second = _qkv(2, 8, 2, Sq, Sq, D, seed=2)
    triton_impl.forward(*first, None, None, None, None, scale, spec)
    out, lse = triton_impl.forward(*second, None, None, None, None, scale, spec)
    assert jit == [1], "the second call of the signature must not go through the JIT"
    triton_impl.clear_plans()
    want, want_lse = triton_impl.forward(*second, None, None, None, None, scale, spec)
    assert jit == [1, 1]
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    err = (out.double() - _ref(*second, scale, causal)).abs().max().item()
    assert err < 2e-3, err


@pytest.mark.parametrize("D,causal", [(64, True), (128, False), (256, True)])
def test_backward_launches_directly_after_the_first_call(monkeypatch, D, causal):
    """The deterministic mode (bit-identical run to run) at each head dim: the preprocess, the
    main kernel and the dQ finish all launch directly on the second call, with the memset of
    the turns (and at d256 the buffers) into fresh scratch."""
    spec = AttentionSpec(window_right=0 if causal else None)
    scale = D ** -0.5
    mod = gluon_bwd.kernel_module()
    jits = [_count_jit(monkeypatch, f) for f in (mod.attn_bwd_preprocess, mod.attn_bwd_kernel, mod.attn_bwd_dq_finish)]
    Sq = 1000
    calls = []
    for seed in (1, 2):
        q, k, v = _qkv(2, 4, 2, Sq, Sq, D, seed=seed)
        out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
        dout = torch.randn_like(out)
        calls.append((dout, q, k, v, out, lse))
        grads = gluon_bwd.backward(dout, q, k, v, out, lse, scale, spec, True)
    assert [len(j) for j in jits] == [1, 1, 1]
    triton_impl.clear_plans()
    want = gluon_bwd.backward(*calls[1], scale, spec, True)
    assert [len(j) for j in jits] == [2, 2, 2]
    for got, ref in zip(grads, want):
        assert torch.equal(got, ref)
        assert not torch.isnan(got).any()


def test_launch_hooks_go_through_the_jit(monkeypatch):
    """A launch hook (a profiler's) sees every launch: with one set, a planned call goes through
    the JIT again."""
    from triton import knobs
    spec = AttentionSpec(window_right=0)
    q, k, v = _qkv(1, 4, 4, 256, 256, 128, seed=3)
    triton_impl.forward(q, k, v, None, None, None, None, 0.1, spec)
    jit = _count_jit(monkeypatch, gluon_fwd.kernel_module().attn_fwd_kernel)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        triton_impl.forward(q, k, v, None, None, None, None, 0.1, spec)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert jit == [1] and len(seen) == 1
    triton_impl.forward(q, k, v, None, None, None, None, 0.1, spec)
    assert jit == [1]


@pytest.mark.parametrize("D", [64, 128])
def test_tl_forward_launches_directly_after_the_first_call(monkeypatch, D):
    """The tl forward (key padding: not a Gluon spec) runs its plan directly from the second call,
    bit-identical to a fresh plan's JIT launch: d64 with pointer loads, d128 with TMA descriptors
    (the default tiles')."""
    from fa3_inductor.codegen import triton_render
    spec = AttentionSpec(window_right=0, key_padding=True)
    jit = _count_jit(monkeypatch, triton_render.load("fwd", spec).attn_fwd)
    kp = torch.ones(2, 1000, dtype=torch.bool, device=DEV)
    kp[1, 700:] = False
    first, second = _qkv(2, 8, 2, 1000, 1000, D, seed=1), _qkv(2, 8, 2, 1000, 1000, D, seed=2)
    triton_impl.forward(*first, None, kp, None, None, D ** -0.5, spec)
    out, lse = triton_impl.forward(*second, None, kp, None, None, D ** -0.5, spec)
    assert jit == [1]
    (plan,) = triton_impl._TL_PLANS.values()
    assert (plan.descs is not None) == plan.cfg.tma == (D == 128)
    triton_impl.clear_plans()
    want, want_lse = triton_impl.forward(*second, None, kp, None, None, D ** -0.5, spec)
    assert jit == [1, 1]
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("D", [64, 128])
def test_tl_backward_launches_directly_after_the_first_call(monkeypatch, D):
    """The tl backward (key padding; deterministic: no atomics, bit-identical run to run) runs
    its preprocess and its dK/dV and dQ kernels (or the fused one) directly from the second call,
    bit-identical to a fresh plan's JIT launches."""
    from fa3_inductor.codegen import triton_render
    spec = AttentionSpec(window_right=0, key_padding=True)
    mod = triton_render.load("bwd", spec)
    names = ("attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused")
    jits = {n: _count_jit(monkeypatch, getattr(mod, n)) for n in names}
    kp = torch.ones(2, 1000, dtype=torch.bool, device=DEV)
    kp[1, 700:] = False
    calls = []
    for seed in (1, 2):
        q, k, v = _qkv(2, 8, 2, 1000, 1000, D, seed=seed)
        out, lse = triton_impl.forward(q, k, v, None, kp, None, None, D ** -0.5, spec)
        calls.append((torch.randn_like(out), q, k, v, out, lse))
        grads = triton_impl.backward(*calls[-1], None, kp, None, None, D ** -0.5, spec, False)
    (plan,) = [p for p in triton_impl._TL_PLANS.values() if isinstance(p, triton_impl._TlBwdPlan)]
    launched = {"attn_bwd_preprocess"} | {"attn_bwd_" + name for name, *_ in plan.kernels}
    assert {n: len(c) for n, c in jits.items()} == {n: int(n in launched) for n in names}
    triton_impl.clear_plans()
    want = triton_impl.backward(*calls[1], None, kp, None, None, D ** -0.5, spec, False)
    assert {n: len(c) for n, c in jits.items()} == {n: 2 * int(n in launched) for n in names}
    for got, ref in zip(grads[:3], want[:3]):
        assert torch.equal(got, ref) and not torch.isnan(got).any()
