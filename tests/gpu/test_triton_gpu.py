"""Triton attention kernels on an H100 (sm_90): numerics against a float64 reference.

Bar: our error vs float64 is at most 2x the error of eager attention computed in the input
precision (naive softmax(q k^T) v in fp16/bf16, what a model would run without us) plus 1e-3,
forward and backward.  No NaN where the reference has none.  Fresh random inputs per case.
"""
import pytest
import torch

from fa3_inductor import reference
from fa3_inductor.spec import AttentionSpec

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 (Hopper) GPU", allow_module_level=True)

from fa3_inductor.ops import triton_impl  # noqa: E402  (imports triton)

DEV = "cuda"


def _eager_lowp(q, k, v, spec, scale, bias, kp, slopes):
    """Eager attention in the input precision (the error budget we are compared against)."""
    Hq, Sq, Sk = q.shape[1], q.shape[2], k.shape[2]
    kx = reference.expand_kv(k, Hq, spec.gqa_mapping)
    vx = reference.expand_kv(v, Hq, spec.gqa_mapping)
    s = torch.matmul(q, kx.transpose(-1, -2)) * scale
    if spec.softcap:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    off = (Sk - Sq) if spec.align == "bottom_right" else 0
    if spec.alibi:
        i = torch.arange(Sq, device=q.device).view(-1, 1) + off
        j = torch.arange(Sk, device=q.device).view(1, -1)
        rel = (j - i).to(s.dtype)
        sl = slopes.to(s.dtype).view(1, -1, 1, 1)
        s = s + (sl * rel if spec.alibi == "linear" else -sl * rel.abs())
    if spec.mask_kind == "additive":
        s = s + bias.to(s.dtype)
    keep = reference.keep_mask(spec, torch.arange(Sq, device=q.device), Sq, Sk, q.device, kp,
                               bias if spec.mask_kind == "bool" else None)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # dead rows: contract says 0
    return torch.matmul(p, vx)


def _grads(fn, inputs, dout):
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    gs = torch.autograd.grad(out, leaves, dout)
    return out.detach(), gs


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _case(B, H, HK, Sq, Sk, D, spec, dtype=torch.float16, with_bias=False, with_kp=False, with_alibi=False):
    torch.manual_seed(B * 1000 + Sq * 7 + Sk + D)
    q = torch.randn(B, H, Sq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, HK, Sk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, HK, Sk, D, device=DEV, dtype=dtype)
    bias = kp = slopes = None
    if spec.mask_kind == "additive":
        bias = torch.randn(B, 1, Sq, Sk, device=DEV, dtype=dtype).expand(B, H, Sq, Sk)
    elif spec.mask_kind == "bool":
        bias = (torch.rand(1, H, Sq, Sk, device=DEV) > 0.2).expand(B, H, Sq, Sk)
    if spec.key_padding:
        kp = torch.ones(B, Sk, dtype=torch.bool, device=DEV)
        kp[-1, Sk // 2:] = False
    if spec.alibi:
        slopes = torch.rand(H, device=DEV)
    return q, k, v, bias, kp, slopes


SPECS = {
    "plain": AttentionSpec(),
    "causal_tl": AttentionSpec(window_right=0),
    "causal_br": AttentionSpec(window_right=0, align="bottom_right"),
    "window": AttentionSpec(window_left=64, window_right=0, align="bottom_right"),
    "window_lr": AttentionSpec(window_left=37, window_right=11),
    "key_padding": AttentionSpec(key_padding=True, window_right=0),
    "additive": AttentionSpec(mask_kind="additive"),
    "bool": AttentionSpec(mask_kind="bool"),
    "alibi_linear": AttentionSpec(alibi="linear", window_right=0),
    "alibi_abs": AttentionSpec(alibi="abs"),
    "softcap": AttentionSpec(softcap=20.0, window_right=0),
    "gqa_mod": AttentionSpec(gqa_mapping="mod"),
}
SHAPES = [  # B, H, HK, Sq, Sk, D
    (2, 4, 4, 1, 17, 64), (2, 4, 2, 17, 17, 64), (1, 8, 2, 113, 1000, 128), (1, 4, 1, 1000, 113, 80),
    (1, 2, 2, 4097, 4097, 128), (2, 4, 4, 256, 256, 256),
]


def _run(spec, shape, dtype=torch.float16):
    B, H, HK, Sq, Sk, D = shape
    q, k, v, bias, kp, slopes = _case(B, H, HK, Sq, Sk, D, spec, dtype)
    scale = D ** -0.5
    # float64 reference (through the reference's own autograd-free backward).
    q64, k64, v64 = q.double(), k.double(), v.double()
    b64 = bias.double() if (bias is not None and bias.dtype != torch.bool) else bias
    spec64 = spec.replace(out_dtype="float64")
    r_out, r_lse = reference.forward(q64, k64, v64, b64, kp, slopes, None, scale, spec64)
    out, lse = triton_impl.forward(q, k, v, bias, kp, slopes, None, scale, spec)
    eager = _eager_lowp(q, k, v, spec, scale, bias, kp, slopes)
    assert not (torch.isnan(out) & ~torch.isnan(r_out)).any(), "NaN in out"
    e_ours, e_eager = _err(out, r_out), _err(eager, r_out)
    assert e_ours <= 2 * e_eager + 1e-3, f"fwd err {e_ours:.3e} vs eager {e_eager:.3e}"
    live = ~torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse), ~live)
    assert _err(lse[live], r_lse[live]) < 1e-2

    dout = torch.randn_like(out)
    want = reference.backward(dout.double(), q64, k64, v64, r_out, r_lse, b64, kp, slopes, None, scale,
                              spec64, False)
    got = triton_impl.backward(dout, q, k, v, out, lse, bias, kp, slopes, None, scale, spec, False)
    _, eg = _grads(lambda a, b, c: _eager_lowp(a, b, c, spec, scale, bias, kp, slopes), (q, k, v), dout)
    for name, g, w, e in zip(("dq", "dk", "dv"), got[:3], want[:3], eg):
        assert not torch.isnan(g).any(), f"NaN in {name}"
        e_ours, e_eager = _err(g, w), _err(e, w)
        assert e_ours <= 2 * e_eager + 1e-3, f"{name} err {e_ours:.3e} vs eager {e_eager:.3e}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["plain", "causal_tl", "causal_br"])
def test_structure(name, shape):
    _run(SPECS[name], shape)


@pytest.mark.parametrize("name", [n for n in SPECS if n not in ("plain", "causal_tl", "causal_br")])
def test_features(name):
    # One shape per feature (each spec compiles its own kernels: keep the run bounded).
    _run(SPECS[name], (2, 4, 2, 113, 1000, 64))


_TMA_CFGS = {"tma": (128, 128, 8, 3, True, False), "tma_lpt": (128, 64, 8, 3, True, True),
             "lpt": (128, 64, 4, 3, False, True)}


@pytest.mark.parametrize("cfg", list(_TMA_CFGS))
@pytest.mark.parametrize("name,shape", [("plain", (1, 8, 2, 113, 1000, 128)), ("causal_br", (1, 4, 1, 1000, 113, 64)),
                                        ("window", (2, 4, 4, 4097, 4097, 128)), ("softcap", (2, 4, 2, 17, 300, 256)),
                                        ("causal_tl", (1, 4, 4, 1, 17, 64))])
def test_tma_lpt_forward(cfg, name, shape):
    """The TMA-descriptor and longest-first forward configs through the whole numerics check
    (the backward runs the default config)."""
    from fa3_inductor.codegen import triton_configs
    c = triton_configs.FwdConfig(*_TMA_CFGS[cfg])
    if shape[-1] == 256:
        c = triton_configs.FwdConfig(128, 32, 8, 3, c.tma, c.lpt)
    with triton_configs.override(fwd=c):
        _run(SPECS[name], shape)


def test_bf16():
    _run(AttentionSpec(window_right=0, out_dtype="bfloat16"), (2, 8, 2, 1000, 1000, 128), dtype=torch.bfloat16)


def test_dropout_matches_reference_mask():
    spec = AttentionSpec(dropout_p=0.2, window_right=0)
    q, k, v, *_ = _case(2, 4, 2, 300, 300, 64, spec)
    seed = torch.tensor([1234, 5678], device=DEV)
    out, lse = triton_impl.forward(q, k, v, None, None, None, seed, 0.125, spec)
    r_out, _ = reference.forward(q, k, v, None, None, None, seed, 0.125, spec)
    assert _err(out, r_out) < 5e-3
    dout = torch.randn_like(out)
    got = triton_impl.backward(dout, q, k, v, r_out, lse, None, None, None, seed, 0.125, spec, False)
    want = reference.backward(dout, q, k, v, r_out, lse, None, None, None, seed, 0.125, spec, False)
    for g, w in zip(got[:3], want[:3]):
        assert _err(g, w) < 2e-2 * max(1.0, w.abs().max().item())


def test_dbias():
    spec = AttentionSpec(mask_kind="additive", window_right=0)
    q, k, v, *_ = _case(1, 4, 4, 500, 700, 64, spec)
    bias = torch.randn(1, 4, 500, 700, device=DEV)
    out, lse = triton_impl.forward(q, k, v, bias, None, None, None, 0.125, spec)
    dout = torch.randn_like(out)
    got = triton_impl.backward(dout, q, k, v, out, lse, bias, None, None, None, 0.125, spec, True)
    want = reference.backward(dout, q, k, v, out, lse, bias, None, None, None, 0.125, spec, True)
    assert _err(got[3], want[3]) < 1e-3


def test_deterministic_backward():
    spec = AttentionSpec(window_right=0)
    q, k, v, *_ = _case(2, 8, 2, 1000, 1000, 128, spec)
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, 0.1, spec)
    dout = torch.randn_like(out)
    a = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, 0.1, spec, False)
    b = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, 0.1, spec, False)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name,shape", [("causal_br", (1, 8, 2, 113, 1000, 128)), ("plain", (2, 4, 4, 4097, 4097, 64)),
                                        ("softcap", (2, 4, 2, 17, 300, 256)), ("window", (2, 4, 4, 1000, 1000, 128))])
def test_atomic_dq(name, shape):
    """config.deterministic_backward = False (dQ by atomics in the dK/dV kernel): same numerics bar."""
    from fa3_inductor import config
    with config.patch(deterministic_backward=False):
        _run(SPECS[name], shape)


@pytest.mark.parametrize("name,shape", [("causal_br", (1, 8, 2, 113, 1000, 128)), ("plain", (2, 4, 4, 4097, 4097, 64)),
                                        ("softcap", (2, 4, 2, 17, 300, 256)), ("window", (2, 4, 4, 1000, 1000, 128)),
                                        ("causal_tl", (2, 8, 8, 1000, 1000, 128))])
def test_fused_backward(name, shape):
    """BwdConfig.fused (dK/dV and dQ programs in one launch) with the table's tiles: the numerics
    bar, and bitwise the results of the two separate kernels."""
    import dataclasses
    from fa3_inductor.codegen import triton_configs
    spec, D = SPECS[name], shape[-1]
    tiles = triton_configs.default_bwd(D, D, spec.causal)
    with triton_configs.override(bwd=dataclasses.replace(tiles, fused=True)):
        _run(spec, shape)
    q, k, v, *_ = _case(*shape, spec)   # these specs have no tensor operands
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, 0.1, spec)
    dout = torch.randn_like(out)
    a, b = (triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, 0.1, spec, False,
                                 config=dataclasses.replace(tiles, fused=f)) for f in (True, False))
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("name,shape", [("causal_br", (1, 8, 2, 113, 1000, 128)), ("plain", (2, 4, 4, 4097, 4097, 64)),
                                        ("softcap", (2, 4, 2, 17, 300, 256)), ("window", (2, 4, 4, 1000, 1000, 128)),
                                        ("key_padding", (2, 4, 4, 1000, 1000, 80)),
                                        ("additive", (1, 4, 4, 256, 384, 64))])
def test_tma_backward(name, shape, fused):
    """BwdConfig.tma (Q, K, V, dO through TMA descriptors) with the table's tiles, fused or not:
    the numerics bar.  Lengths no tile divides read past Sq / Sk through TMA's zero fill, d80
    past the head dim (128 lanes)."""
    import dataclasses
    from fa3_inductor.codegen import triton_configs
    spec, D = SPECS[name], shape[-1]
    tiles = triton_configs.default_bwd(D, D, spec.causal)
    with triton_configs.override(bwd=dataclasses.replace(tiles, tma=True, fused=fused)):
        _run(spec, shape)


def test_autotune_picks_and_caches_tiles(tmp_path, monkeypatch):
    """mode="max-autotune" turns autotune.py on: the first call of a spec and shape bucket times
    the candidate tiles, keeps the fastest (forward and backward), writes it to the on-disk table,
    and the result still meets the numerics bar."""
    from fa3_inductor import autotune
    monkeypatch.setattr(autotune, "_path", lambda: tmp_path / "autotune.json")
    monkeypatch.setattr(autotune, "_table", None)
    with autotune.enabled_ctx(True):
        _run(SPECS["causal_br"], (1, 4, 2, 200, 333, 64))
    import json
    table = json.loads((tmp_path / "autotune.json").read_text())
    assert {key.split("|")[0] for key in table} == {"fwd", "bwd"}, table.keys()


# ---- the Gluon forward (ops/gluon_fwd.py): what gluon_supports() routes there ----------------

def _gluon_spy(monkeypatch):
    """Counts the Gluon forward's calls (the route is asserted, not assumed)."""
    from fa3_inductor.ops import gluon_fwd
    calls = []
    real = gluon_fwd.forward
    monkeypatch.setattr(gluon_fwd, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _gluon_inputs(B, Hq, Hk, Sq, Sk, D, dtype, transposed, seed):
    torch.manual_seed(seed)
    if transposed:   # [B, S, H, D].transpose(1, 2): HF / nanoGPT layout, read without a copy
        mk = lambda H, S: torch.randn(B, S, H, D, device=DEV, dtype=dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda H, S: torch.randn(B, H, S, D, device=DEV, dtype=dtype)  # noqa: E731
    return mk(Hq, Sq), mk(Hk, Sk), mk(Hk, Sk)


_GLUON_CASES = [  # D, dtype, causal, (B, Hq, Hk, Sq, Sk), transposed
    (128, "fp16", "none", (2, 4, 4, 1, 1), False),
    (128, "fp16", "none", (1, 8, 2, 17, 17), True),
    (128, "fp16", "none", (1, 2, 2, 4097, 4097), False),
    (128, "fp16", "tl", (1, 8, 1, 113, 1000), False),
    (128, "fp16", "tl", (1, 4, 4, 1000, 113), True),
    (128, "fp16", "br", (1, 8, 2, 113, 1000), False),
    (128, "fp16", "br", (2, 4, 4, 1000, 113), False),     # rows with no key: out 0, lse -inf
    (128, "fp16", "br", (2, 4, 4, 17, 1), True),
    (128, "bf16", "none", (2, 4, 4, 1000, 4097), True),
    (128, "bf16", "tl", (1, 4, 1, 4097, 4097), False),
    (128, "bf16", "br", (1, 8, 2, 1, 17), False),
    (256, "fp16", "none", (1, 4, 4, 113, 113), False),
    (256, "fp16", "tl", (2, 4, 2, 1000, 1000), True),
    (256, "fp16", "br", (1, 4, 4, 4097, 1000), False),
    (256, "bf16", "none", (1, 8, 1, 17, 4097), False),
    (256, "bf16", "tl", (1, 2, 2, 1, 1), False),
    (256, "bf16", "br", (1, 8, 8, 1000, 4097), True),
]


@pytest.mark.parametrize("D,dt,causal,shape,transposed", _GLUON_CASES,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_gluon_forward(D, dt, causal, shape, transposed, monkeypatch):
    """triton_impl.forward on the Gluon route against the float64 reference (the module's bar);
    lse exact in -inf (dead rows of bottom-right causal with Sq > Sk) and close elsewhere."""
    B, Hq, Hk, Sq, Sk = shape
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    spec = AttentionSpec(window_right=None if causal == "none" else 0,
                         align="bottom_right" if causal == "br" else "top_left",
                         out_dtype={"fp16": "float16", "bf16": "bfloat16"}[dt])
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, dtype, transposed, seed=Sq * 7 + Sk + D)
    scale = D ** -0.5
    assert triton_impl.gluon_supports(q, k, v, None, None, None, None, spec, scale=scale) is None
    calls = _gluon_spy(monkeypatch)
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, scale, spec)
    assert calls == [1], "the Gluon forward did not run"
    assert out.is_contiguous()
    check_plain_forward(q, k, v, spec, scale, out, lse)


def check_plain_forward(q, k, v, spec, scale, out, lse):
    """out / lse of a maskless or causal forward against float64 (the bar: 2x eager in the
    input dtype + 1e-3); rows with no key: lse -inf and out 0.  Shared with the persistent
    Gluon forward's tests."""
    B, Hq, Sq, D = q.shape
    assert out.shape == (B, Hq, Sq, D) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    spec64 = spec.replace(out_dtype="float64")
    r_out, r_lse = reference.forward(q.double(), k.double(), v.double(), None, None, None, None, scale, spec64)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "NaN"
    e_ours = _err(out, r_out)
    e_eager = _err(_eager_lowp(q, k, v, spec, scale, None, None, None), r_out)
    assert e_ours <= 2 * e_eager + 1e-3, f"fwd err {e_ours:.3e} vs eager {e_eager:.3e}"
    live = ~torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse), ~live)
    assert (out[~live] == 0).all()
    if live.any():
        assert _err(lse[live], r_lse[live]) < 1e-3


@pytest.mark.parametrize("D,Sq,causal", [(128, 17, True), (128, 1000, False), (256, 113, True), (256, 4097, False)])
def test_gluon_forward_writes_only_its_rows(D, Sq, causal):
    """Poisoned (NaN) outputs: out a view [B, H, :Sq] of a taller buffer, so a partial query tile
    writing past Sq would land in the poisoned rows (the TMA store must clip them); every row of
    out and lse is written."""
    from fa3_inductor.ops import gluon_fwd
    B, H = 2, 3
    q, k, v = _gluon_inputs(B, H, H, Sq, Sq, D, torch.float16, False, seed=Sq + D)
    big = torch.full((B, H, Sq + 128, D), float("nan"), device=DEV, dtype=torch.float16)
    lse_buf = torch.full((B, H, Sq), float("nan"), device=DEV)
    launch, out, lse = gluon_fwd.prepare(q, k, v, D ** -0.5, causal, False, out=big[:, :, :Sq], lse=lse_buf)
    launch()
    assert torch.isnan(big[:, :, Sq:]).all(), "rows past Sq were written"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    want, want_lse = triton_impl.forward(q, k, v, None, None, None, None, D ** -0.5, AttentionSpec(
        window_right=0 if causal else None))
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


# top_left: the tl backward kernels of these specs are the ones test_bf16 / test_structure build
@pytest.mark.parametrize("D,dt,align", [(128, "bf16", "top_left"), (256, "fp16", "top_left")])
def test_gluon_forward_backward_through_op(D, dt, align, monkeypatch):
    """torch autograd through fa3::attention_fwd with kernel="triton": the forward runs on Gluon,
    the tl backward uses its out and lse, the gradients meet the bar against float64."""
    from fa3_inductor.ops import attention_op
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    spec = AttentionSpec(window_right=0, align=align, kernel="triton",
                         out_dtype={"fp16": "float16", "bf16": "bfloat16"}[dt])
    B, Hq, Hk, Sq, Sk = 2, 8, 2, 300, 700
    q, k, v = _gluon_inputs(B, Hq, Hk, Sq, Sk, D, dtype, True, seed=D)
    scale = D ** -0.5
    calls = _gluon_spy(monkeypatch)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = attention_op.attention(*leaves, scale=scale, spec=spec.to_json())
    assert calls == [1], "the Gluon forward did not run"
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    spec64 = spec.replace(out_dtype="float64", kernel="")
    q64, k64, v64 = q.double(), k.double(), v.double()
    r_out, r_lse = reference.forward(q64, k64, v64, None, None, None, None, scale, spec64)
    want = reference.backward(dout.double(), q64, k64, v64, r_out, r_lse, None, None, None, None, scale,
                              spec64, False)
    _, eg = _grads(lambda a, b, c: _eager_lowp(a, b, c, spec, scale, None, None, None), (q, k, v), dout)
    assert _err(out, r_out) <= 2 * _err(_eager_lowp(q, k, v, spec, scale, None, None, None), r_out) + 1e-3
    for name, g, w, e in zip(("dq", "dk", "dv"), got, want[:3], eg):
        assert not torch.isnan(g).any(), f"NaN in {name}"
        e_ours, e_eager = _err(g, w), _err(e, w)
        assert e_ours <= 2 * e_eager + 1e-3, f"{name} err {e_ours:.3e} vs eager {e_eager:.3e}"
