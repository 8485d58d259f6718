"""The custom op torch.ops.fa3.attention_fwd / attention_bwd, called directly: every AttentionSpec
feature against an independent naive float64 formulation, fully masked rows, dropout, fake
tensors, opcheck, argument errors, and AttentionSpec validation / serialisation."""
from __future__ import annotations

import math

import pytest
import torch

import fa3_inductor.ops.attention_op  # noqa: F401  (registers torch.ops.fa3.*)
from fa3_inductor.spec import AttentionSpec

from helpers import assert_close

OP = torch.ops.fa3.attention_fwd
F64 = torch.float64
# float64 tests: the op keeps lse, dead-row means and dropout scales in fp32 (the kernel contract),
# so float64 results agree with the naive formulation to ~1e-7 relative, not to 1e-15.


def spec(**kw) -> AttentionSpec:
    kw.setdefault("out_dtype", "float64")
    return AttentionSpec(**kw)


def call(q, k, v, sp, scale, bias=None, kp=None, slopes=None, seed=None):
    return OP(q, k, v, bias, kp, slopes, seed, float(scale), sp.to_json())


# ---------------------------------------------------------------------------------------------
# an independent naive formulation (float64, materialised masks, torch.softmax)
# ---------------------------------------------------------------------------------------------
def expand_heads(x, hq, mapping):
    hk = x.shape[1]
    if hk == hq:
        return x
    g = hq // hk
    return x.repeat_interleave(g, dim=1) if mapping == "div" else x.repeat(1, g, 1, 1)


def naive(q, k, v, sp: AttentionSpec, scale, bias=None, kp=None, slopes=None):
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    k, v = expand_heads(k, Hq, sp.gqa_mapping), expand_heads(v, Hq, sp.gqa_mapping)
    s = q @ k.transpose(-1, -2) * scale
    if sp.softcap:
        s = sp.softcap * torch.tanh(s / sp.softcap)
    off = Sk - Sq if sp.align == "bottom_right" else 0
    i = torch.arange(Sq).view(-1, 1) + off
    j = torch.arange(Sk).view(1, -1)
    if sp.alibi:
        sl = slopes.double().view(1, -1, 1, 1)
        s = s + (sl * (j - i) if sp.alibi == "linear" else -sl * (j - i).abs())
    if sp.mask_kind == "additive":
        s = s + bias.double()
    keep = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool)
    if sp.window_right is not None:
        keep = keep & (j <= i + sp.window_right)
    if sp.window_left is not None:
        keep = keep & (j >= i - sp.window_left)
    if sp.key_padding:
        keep = keep & kp.bool().view(B, 1, 1, Sk)
    if sp.mask_kind == "bool":
        keep = keep & bias.bool()
    mv = sp.masked_value
    if mv == "neg_inf":
        s = s.masked_fill(~keep, float("-inf"))
    elif mv == "min_fill":
        s = s.masked_fill(~keep, torch.finfo(F64).min)
    elif mv == "min_additive":
        s = s + torch.where(keep, torch.tensor(0.0, dtype=F64), torch.tensor(torch.finfo(F64).min, dtype=F64))
    else:  # zero
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mv == "zero":
        p = torch.where(keep.any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v


def rand(*shape, dtype=F64, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 1000)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def qkv(B=2, Hq=4, Hk=None, Sq=7, Sk=9, D=8, Dv=None, dtype=F64, requires_grad=False):
    Hk = Hk or Hq
    Dv = Dv or D
    return (rand(B, Hq, Sq, D, dtype=dtype, requires_grad=requires_grad, seed=1),
            rand(B, Hk, Sk, D, dtype=dtype, requires_grad=requires_grad, seed=2),
            rand(B, Hk, Sk, Dv, dtype=dtype, requires_grad=requires_grad, seed=3))


def check_fwd_bwd(sp, q, k, v, scale, **extra):
    """Forward vs naive, and backward vs autograd of naive (float64)."""
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = call(q, k, v, sp, scale, **extra)
    ref = naive(q, k, v, sp, scale, **extra)
    assert out.dtype == sp.out_torch_dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close(out, ref, atol=1e-6, rtol=1e-5, what="forward")
    g = rand(*out.shape, seed=7)
    fin = ~torch.isnan(ref)
    gq, gk, gv = torch.autograd.grad((torch.where(fin, out, 0) * g).sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad((torch.where(fin, ref, 0) * g).sum(), (q, k, v))
    for a, b, n in ((gq, rq, "dq"), (gk, rk, "dk"), (gv, rv, "dv")):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what=n)  # lse is fp32 (contract)
    return out, ref


# ---------------------------------------------------------------------------------------------
# spec features
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("sq,sk", [(5, 9), (9, 9), (9, 5)])
def test_causal(align, sq, sk):
    q, k, v = qkv(Sq=sq, Sk=sk)
    sp = spec(align=align, window_right=0)
    if align == "bottom_right" and sq > sk:
        sp = sp.replace(masked_value="min_fill")  # first rows are dead: keep them finite
    check_fwd_bwd(sp, q, k, v, 0.3)


@pytest.mark.parametrize("wl,wr", [(2, 0), (3, 1), (None, 2), (1, None), (0, 0)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_window(wl, wr, align):
    q, k, v = qkv(Sq=6, Sk=10)
    check_fwd_bwd(spec(align=align, window_left=wl, window_right=wr), q, k, v, 0.35)


def test_key_padding():
    q, k, v = qkv(Sq=5, Sk=7)
    kp = torch.ones(2, 7, dtype=torch.bool)
    kp[0, 5:] = False
    kp[1, :2] = False
    check_fwd_bwd(spec(key_padding=True), q, k, v, 0.3, kp=kp)


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 1, 7), (1, 4, 5, 7), (2, 1, 5, 7), (2, 4, 5, 7), (7,)])
def test_additive_mask_broadcast(shape):
    q, k, v = qkv(Sq=5, Sk=7)
    bias = rand(*shape, seed=11, requires_grad=True)
    out, lse = call(q, k, v, spec(mask_kind="additive"), 0.3, bias=bias)
    ref = naive(q, k, v, spec(mask_kind="additive"), 0.3, bias=bias)
    assert_close(out, ref, atol=1e-6, rtol=1e-5, what="forward")
    g = rand(*out.shape, seed=5)
    (db,) = torch.autograd.grad((out * g).sum(), (bias,))
    (rb,) = torch.autograd.grad((ref * g).sum(), (bias,))
    assert db.shape == bias.shape
    assert_close(db, rb, atol=1e-6, rtol=1e-5, what="dbias")


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 1, 7), (1, 4, 5, 7), (2, 1, 5, 7)])
def test_bool_mask_broadcast(shape):
    q, k, v = qkv(Sq=5, Sk=7)
    g = torch.Generator().manual_seed(3)
    m = torch.rand(*shape, generator=g) > 0.3
    m[..., 0] = True  # no dead rows here (they have their own tests)
    check_fwd_bwd(spec(mask_kind="bool"), q, k, v, 0.3, bias=m)


@pytest.mark.parametrize("kind", ["linear", "abs"])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_alibi(kind, align):
    q, k, v = qkv(Sq=5, Sk=8)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32)
    check_fwd_bwd(spec(alibi=kind, align=align, window_right=0), q, k, v, 0.3, slopes=slopes)


def test_softcap():
    q, k, v = qkv(Sq=6, Sk=6)
    q = q * 4  # large scores: the cap matters
    check_fwd_bwd(spec(softcap=2.5), q.detach(), k, v, 0.5)


@pytest.mark.parametrize("mapping", ["div", "mod"])
def test_gqa(mapping):
    q, k, v = qkv(Hq=6, Hk=2, Sq=5, Sk=7)
    check_fwd_bwd(spec(gqa_mapping=mapping, window_right=0), q, k, v, 0.3)


def test_gqa_mappings_differ():
    q, k, v = qkv(Hq=4, Hk=2)
    a, _ = call(q, k, v, spec(gqa_mapping="div"), 0.3)
    b, _ = call(q, k, v, spec(gqa_mapping="mod"), 0.3)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("sq", [1, 17, 113])
@pytest.mark.parametrize("sk", [1, 17, 113])
def test_odd_sizes(sq, sk):
    q, k, v = qkv(B=1, Hq=2, Sq=sq, Sk=sk, D=5, Dv=3)
    check_fwd_bwd(spec(), q, k, v, 1 / math.sqrt(5))
    check_fwd_bwd(spec(align="bottom_right", window_right=0, masked_value="min_fill"), q, k, v, 0.4)


def test_combined_features():
    q, k, v = qkv(Hq=4, Hk=2, Sq=6, Sk=9)
    kp = torch.ones(2, 9, dtype=torch.bool)
    kp[1, -2:] = False
    bias = rand(1, 4, 6, 9, seed=4)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    sp = spec(align="bottom_right", window_left=4, window_right=0, softcap=3.0, alibi="linear",
              key_padding=True, mask_kind="additive", gqa_mapping="mod")
    check_fwd_bwd(sp, q, k, v, 0.3, kp=kp, bias=bias, slopes=slopes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_within_2x_of_eager(dtype):
    from helpers import assert_within_2x
    q, k, v = qkv(Sq=16, Sk=16, D=16, dtype=dtype)
    sp = AttentionSpec(window_right=0, out_dtype=str(dtype).split(".")[-1])
    out, _ = call(q, k, v, sp, 0.25)
    assert out.dtype == dtype
    ref = naive(q, k, v, sp, 0.25)
    # eager in the input precision: the usual formulation (softmax in fp32 for low precision)
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    eager = torch.softmax(s.float(), -1).to(dtype) @ v
    assert_within_2x(out, eager, ref, what=str(dtype))


# ---------------------------------------------------------------------------------------------
# fully masked rows
# ---------------------------------------------------------------------------------------------
def _dead_setup():
    q, k, v = qkv(Sq=6, Sk=5)
    kp = torch.ones(2, 5, dtype=torch.bool)
    kp[1] = False                # batch 1: every row dead
    return q, k, v, kp


def test_dead_rows_neg_inf_nan():
    q, k, v, kp = _dead_setup()
    out, lse = call(q, k, v, spec(key_padding=True, masked_value="neg_inf"), 0.3, kp=kp)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[0]).any()
    assert torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("mv", ["min_additive", "min_fill"])
def test_dead_rows_min_uniform(mv):
    q, k, v, kp = _dead_setup()
    out, _ = call(q, k, v, spec(key_padding=True, masked_value=mv), 0.3, kp=kp)
    vmean = v[1].mean(dim=1, keepdim=True).expand_as(out[1])
    assert_close(out[1], vmean, atol=1e-6, rtol=1e-5, what="uniform rows")
    assert_close(out, naive(q, k, v, spec(key_padding=True, masked_value=mv), 0.3, kp=kp),
                 atol=1e-6, rtol=1e-5, what="forward")


def test_dead_rows_zero():
    q, k, v, kp = _dead_setup()
    out, _ = call(q, k, v, spec(key_padding=True, masked_value="zero"), 0.3, kp=kp)
    assert (out[1] == 0).all()
    assert not torch.isnan(out).any()


def test_dead_rows_from_window():
    # bottom-right causal with sq > sk: the first sq - sk rows see no key
    q, k, v = qkv(Sq=7, Sk=4)
    out, _ = call(q, k, v, spec(align="bottom_right", window_right=0), 0.3)
    assert torch.isnan(out[:, :, :3]).all() and not torch.isnan(out[:, :, 3:]).any()
    out2, _ = call(q, k, v, spec(align="bottom_right", window_right=0, masked_value="min_fill"), 0.3)
    assert_close(out2[:, :, :3], v.mean(2, keepdim=True).expand(-1, -1, 3, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gqa", [False, "div", "mod"])
def test_dead_rows_min_additive_gradients_vs_eager(gqa):
    """Eager: scores + where(keep, 0, finfo.min) in float64, autograd through the addition."""
    Hk = 2 if gqa else 4
    q, k, v = qkv(Hq=4, Hk=Hk, Sq=6, Sk=5, requires_grad=True)
    kp = torch.ones(2, 5, dtype=torch.bool)
    kp[1] = False
    kp[0, 3:] = False
    sp = spec(key_padding=True, masked_value="min_additive", gqa_mapping=gqa or "div")
    out, _ = call(q, k, v, sp, 0.3, kp=kp)
    ref = naive(q, k, v, sp, 0.3, kp=kp)
    assert_close(out, ref, atol=1e-6, rtol=1e-5, what="forward")
    g = rand(*out.shape, seed=9)
    got = torch.autograd.grad((out * g).sum(), (q, k, v))
    exp = torch.autograd.grad((ref * g).sum(), (q, k, v))
    assert exp[0][1].abs().sum() > 0, "eager gives the dead rows a dq (through the additive mask)"
    for a, b, n in zip(got, exp, ("dq", "dk", "dv")):
        assert_close(a, b, atol=1e-6, rtol=1e-5, what=n)  # lse is fp32 (contract)


def test_dead_rows_min_fill_gradients_vs_eager():
    q, k, v = qkv(Sq=6, Sk=5, requires_grad=True)
    kp = torch.ones(2, 5, dtype=torch.bool)
    kp[1] = False
    check_fwd_bwd(spec(key_padding=True, masked_value="min_fill"), q, k, v, 0.3, kp=kp)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(p):
    B, H, S = 2, 4, 64
    q = torch.zeros(B, H, S, 8, dtype=F64)          # uniform probabilities 1/S
    k = rand(B, H, S, 8, seed=2)
    v = torch.eye(S, dtype=F64).expand(B, H, S, S)  # out[i, j] = p_ij * keep_ij / (1 - p)
    seed = torch.tensor([1234, 0], dtype=torch.int64)
    out, _ = call(q, k, v, spec(dropout_p=p), 1.0, seed=seed)
    kept = out != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac
    vals = out[kept]
    assert_close(vals, torch.full_like(vals, 1.0 / (S * (1 - p))), atol=1e-9, rtol=1e-6, what="kept value")
    # the same seed gives the same mask; another seed another one
    out2, _ = call(q, k, v, spec(dropout_p=p), 1.0, seed=seed.clone())
    assert torch.equal(out, out2)
    out3, _ = call(q, k, v, spec(dropout_p=p), 1.0, seed=torch.tensor([99, 0]))
    assert not torch.equal(out, out3)
    # rows are not all dropped the same way
    assert not torch.equal(kept[0, 0, 0], kept[0, 0, 1])


def test_dropout_gradcheck():
    q, k, v = qkv(B=1, Hq=2, Sq=4, Sk=5, D=3, requires_grad=True)
    seed = torch.tensor([7, 3], dtype=torch.int64)
    sp = spec(dropout_p=0.3, window_right=1)

    def f(q, k, v):
        return OP(q, k, v, None, None, None, seed, 0.5, sp.to_json())[0]
    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-7)


@pytest.mark.parametrize("sp_kw", [dict(), dict(window_left=1, window_right=0, softcap=2.0),
                                   dict(alibi="abs"), dict(gqa_mapping="mod")])
def test_gradcheck(sp_kw):
    Hk = 1 if sp_kw.get("gqa_mapping") else 2
    q, k, v = qkv(B=1, Hq=2, Hk=Hk, Sq=3, Sk=4, D=3, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25]) if sp_kw.get("alibi") else None
    sp = spec(**sp_kw)

    def f(q, k, v):
        return OP(q, k, v, None, None, slopes, None, 0.5, sp.to_json())[0]
    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# fake tensors and opcheck
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16", "float32"])
def test_fake_tensor_shapes(out_dtype):
    from torch._subclasses import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 8, 5, 16, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 9, 16, dtype=torch.bfloat16)
        v = torch.empty(2, 2, 9, 12, dtype=torch.bfloat16)
        bias = torch.empty(1, 1, 5, 9)
        out, lse = OP(q, k, v, bias, None, None, None, 0.25,
                      AttentionSpec(mask_kind="additive", out_dtype=out_dtype).to_json())
        assert out.shape == (2, 8, 5, 12) and out.dtype == getattr(torch, out_dtype)
        assert lse.shape == (2, 8, 5) and lse.dtype == torch.float32
        dq, dk, dv, db = torch.ops.fa3.attention_bwd(
            torch.empty(2, 8, 5, 12, dtype=torch.bfloat16), q, k, v, out, lse, bias, None, None, None,
            0.25, AttentionSpec(mask_kind="additive", out_dtype=out_dtype).to_json(), True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert db.shape == bias.shape


def _opcheck_cases():
    q, k, v = qkv(B=1, Hq=4, Hk=2, Sq=3, Sk=5, D=4, dtype=torch.float32, requires_grad=True)
    kp = torch.tensor([[True, True, False, True, True]])
    bias = torch.randn(1, 1, 3, 5, requires_grad=True)
    yield "plain", (q, k, v, None, None, None, None, 0.5, AttentionSpec(out_dtype="float32").to_json())
    yield "causal_kp", (q, k, v, None, kp, None, None, 0.5,
                        AttentionSpec(window_right=0, key_padding=True, out_dtype="float32").to_json())
    yield "bias", (q, k, v, bias, None, None, None, 0.5,
                   AttentionSpec(mask_kind="additive", out_dtype="float32").to_json())
    yield "alibi_softcap", (q, k, v, None, None, torch.tensor([0.5, 0.25, 0.1, 0.05]), None, 0.5,
                            AttentionSpec(alibi="linear", softcap=5.0, out_dtype="float32").to_json())


@pytest.mark.parametrize("case", ["plain", "causal_kp", "bias", "alibi_softcap"])
def test_opcheck_fwd(case):
    args = dict(_opcheck_cases())[case]
    torch.library.opcheck(torch.ops.fa3.attention_fwd.default, args)


def test_opcheck_bwd():
    q, k, v = qkv(B=1, Hq=2, Sq=3, Sk=4, D=4, dtype=torch.float32)
    sp = AttentionSpec(window_right=0, out_dtype="float32").to_json()
    out, lse = OP(q, k, v, None, None, None, None, 0.5, sp)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fa3.attention_bwd.default,
                          (dout, q, k, v, out, lse, None, None, None, None, 0.5, sp, False))


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------
def _bad_calls():
    q, k, v = qkv(Hq=4, Hk=2, Sq=5, Sk=6, dtype=torch.float32)
    s = AttentionSpec(out_dtype="float32")
    yield "3-D inputs", (q[0], k[0], v[0], None, None, None, None, 0.3, s), "4-D"
    yield "heads not a multiple", (q[:, :3], k, v, None, None, None, None, 0.3, s), "multiple"
    yield "head dim mismatch", (q[..., :7], k, v, None, None, None, None, 0.3, s), "head dim"
    yield "batch mismatch", (torch.cat([q, q[:1]]), k, v, None, None, None, None, 0.3, s), "batch"
    yield "k/v length mismatch", (q, k, v[:, :, :5], None, None, None, None, 0.3, s), "length"
    yield "key_padding missing", (q, k, v, None, None, None, None, 0.3, s.replace(key_padding=True)), \
        "key_padding"
    yield "key_padding shape", (q, k, v, None, torch.ones(2, 5, dtype=torch.bool), None, None, 0.3,
                                s.replace(key_padding=True)), "key_padding"
    yield "alibi slopes missing", (q, k, v, None, None, None, None, 0.3, s.replace(alibi="linear")), "alibi"
    yield "seed missing", (q, k, v, None, None, None, None, 0.3, s.replace(dropout_p=0.1)), "seed"
    yield "bias missing", (q, k, v, None, None, None, None, 0.3, s.replace(mask_kind="additive")), "bias"
    yield "bias not broadcastable", (q, k, v, torch.randn(3, 5, 6), None, None, None, 0.3,
                                     s.replace(mask_kind="additive")), "bias"
    yield "bias without mask_kind", (q, k, v, torch.randn(5, 6), None, None, None, 0.3, s), "mask_kind"


_BAD = {name: (args, word) for name, args, word in _bad_calls()}


@pytest.mark.parametrize("name", list(_BAD))
def test_bad_args_clear_value_error(name):
    args, word = _BAD[name]
    args = list(args)
    args[-1] = args[-1].to_json()
    with pytest.raises(ValueError) as ei:
        OP(*args)
    assert word.lower() in str(ei.value).lower(), str(ei.value)


# ---------------------------------------------------------------------------------------------
# AttentionSpec
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("align", "center"), ("window_left", -1), ("window_right", 1.5), ("window_left", True),
    ("softcap", 0.0), ("softcap", -2.0), ("alibi", "quadratic"), ("mask_kind", "float"),
    ("masked_value", "nan"), ("gqa_mapping", "interleave"), ("dropout_p", 1.0), ("dropout_p", -0.1),
    ("softmax_dtype", "int8"), ("out_dtype", "float8"),
])
def test_spec_validation_names_field(field, value):
    with pytest.raises(ValueError) as ei:
        AttentionSpec(**{field: value})
    assert field in str(ei.value), str(ei.value)


@pytest.mark.parametrize("kw", [
    dict(), dict(align="bottom_right", window_left=3, window_right=0), dict(softcap=30.0, alibi="abs"),
    dict(mask_kind="additive", key_padding=True, masked_value="min_additive", gqa_mapping="mod"),
    dict(dropout_p=0.125, softmax_dtype="bfloat16", out_dtype="bfloat16", scale_repr="0.125"),
    dict(mask_kind="bool", masked_value="zero", window_right=5, softcap=2.5),
])
def test_spec_json_round_trip(kw):
    s = AttentionSpec(**kw)
    text = s.to_json()
    assert isinstance(text, str)
    back = AttentionSpec.from_json(text)
    assert back == s and back.to_json() == text
    # a new object from fresh text (not a cache hit) compares equal too
    assert AttentionSpec(**__import__("json").loads(text)) == s


def test_spec_derived_views():
    s = AttentionSpec(align="bottom_right", window_right=0, window_left=4)
    assert s.causal and s.causal_kind == "bottom_right" and s.has_window
    assert not AttentionSpec().causal and AttentionSpec().causal_kind == "none"
    assert AttentionSpec(out_dtype="bfloat16").out_torch_dtype == torch.bfloat16
    d = AttentionSpec(window_right=0, softcap=50.0, key_padding=True, dropout_p=0.1).describe()
    for word in ("causal=top_left", "softcap=50", "key_padding", "dropout=0.1"):
        assert word in d, d


def test_dispatch_decision_remembered_per_call_signature(monkeypatch):
    """The supports() chain runs once per call signature (dtype, shapes, strides, alignment,
    spec, kernel), not on every call; a different layout is a new decision."""
    from fa3_inductor.ops import dispatch
    from fa3_inductor.ops.signature_cache import SignatureCache
    calls = []
    real = dispatch._choose
    monkeypatch.setattr(dispatch, "_memo", SignatureCache())
    monkeypatch.setattr(dispatch, "_choose", lambda *a: calls.append(a) or real(*a))
    q = torch.randn(1, 2, 5, 8)
    spec = AttentionSpec(window_right=0)
    first = dispatch.choose(q, q, q, None, spec)
    assert dispatch.choose(q.clone(), q, q, None, spec) is first and len(calls) == 1
    dispatch.choose(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, None, spec)
    dispatch.choose(q, q, q, None, AttentionSpec())
    dispatch.choose(q, q, q, None, spec, kernel="triton")
    assert len(calls) == 4


def test_auto_kernel_order_follows_measured_table():
    """kernel="auto" tries Triton first only in the buckets where it measured faster than the
    CUDA template (ops/kernel_table.py); explicit kernels are taken as given."""
    from fa3_inductor.ops import dispatch
    from fa3_inductor.ops.kernel_table import triton_first

    def order(d, s, spec, kernel="auto"):
        kv = torch.empty(1, 1, s, d)
        return dispatch._kernel_order(kernel, torch.empty(1, 1, s, d), kv, kv, spec)
    causal, full = AttentionSpec(window_right=0), AttentionSpec()
    assert order(64, 2048, causal) == ["triton", "cuda"] and order(64, 8192, causal) == ["cuda", "triton"]
    assert order(64, 2048, full) == ["triton", "cuda"] and order(64, 4096, full) == ["cuda", "triton"]
    assert order(128, 1024, causal) == ["cuda", "triton"] and order(128, 512, full) == ["cuda", "triton"]
    assert order(256, 1024, causal) == ["cuda", "triton"]
    assert order(48, 1024, causal) == ["triton", "cuda"]          # head dims bucket upwards
    assert order(64, 2048, causal, kernel="cuda") == ["cuda"]
    assert triton_first(32, 4096, True) and not triton_first(96, 1024, True)
    # decoding with one kv head expand()ed to the query heads: packed by the CUDA template
    q1 = torch.empty(2, 8, 1, 64)
    kv1 = torch.empty(2, 1, 2048, 64).expand(2, 8, 2048, 64)
    assert dispatch._kernel_order("auto", q1, kv1, kv1, full) == ["cuda", "triton"]


def test_spec_kernel_between_call_argument_and_global_config(monkeypatch):
    """dispatch.choose: an explicit kernel argument, else the kernel the site was compiled with
    (AttentionSpec.kernel), else config.kernel at run time."""
    from fa3_inductor import config
    from fa3_inductor.ops import dispatch
    seen = []
    monkeypatch.setattr(dispatch, "_choose", lambda q, k, v, bias, spec, kernel: seen.append(kernel) or kernel)
    dispatch._memo.clear()
    q = torch.randn(1, 2, 8, 16)
    base = AttentionSpec()
    dispatch.choose(q, q, q, None, base)
    dispatch.choose(q, q, q, None, base.replace(kernel="triton"))
    dispatch.choose(q, q, q, None, base.replace(kernel="triton"), kernel="cuda")
    with config.patch(kernel="reference"):
        dispatch.choose(q, q, q, None, base.replace(kernel="auto"))
        dispatch.choose(q, q, q, None, base)
    assert seen == ["auto", "triton", "cuda", "auto", "reference"]
    dispatch._memo.clear()


def test_spec_run_settings_are_not_semantics():
    """kernel / autotune change how a site runs, not what it computes: caches and the FP8
    rotation's seed key on semantic_json(); bad values are named."""
    from fa3_inductor.fp8 import attention as fp8_attention
    a = AttentionSpec(window_right=0, fp8=True)
    b = a.replace(kernel="triton", autotune=True, deterministic_backward=False)
    assert a.semantic_json() == b.semantic_json() and a.to_json() != b.to_json()
    assert AttentionSpec.from_json(b.to_json()) == b
    assert torch.equal(fp8_attention.signs_for(a, 64, torch.device("cpu")),
                       fp8_attention.signs_for(b, 64, torch.device("cpu")))
    with pytest.raises(ValueError, match="AttentionSpec.kernel='fast'"):
        AttentionSpec(kernel="fast")


def test_autotune_best_impl_times_and_caches(tmp_path, monkeypatch):
    """Under kernel "auto" with autotuning, the implementation is chosen by timing each one's
    forward on the call's inputs (once per spec and shape bucket; the on-disk table remembers)."""
    import sys
    import types
    from fa3_inductor import autotune
    monkeypatch.setattr(autotune, "_path", lambda: tmp_path / "autotune.json")
    monkeypatch.setattr(autotune, "_table", None)
    calls = []

    def impl(name, ms):
        def forward(*args):
            calls.append(name)
        return types.SimpleNamespace(forward=forward, ms=ms, name=name)
    impls = {"cuda": impl("cuda", 2.0), "triton": impl("triton", 1.5)}
    fake_testing = types.SimpleNamespace(do_bench=lambda fn, **kw: (fn(), impls[calls[-1]].ms)[1])
    monkeypatch.setitem(sys.modules, "triton.testing", fake_testing)
    q = torch.randn(1, 2, 100, 64)
    spec = AttentionSpec(autotune=True)
    assert autotune.best_impl(q, q, q, spec, impls) == "triton"
    n = len(calls)
    assert autotune.best_impl(q, q, q, spec.replace(autotune=False), impls) == "triton" and len(calls) == n
    monkeypatch.setattr(autotune, "_table", None)  # a later process: read back from disk
    assert autotune.best_impl(q, q, q, spec, impls) == "triton" and len(calls) == n
