"""The Triton attention kernels against fa3_inductor.reference, on CPU through Triton's
interpreter (TRITON_INTERPRET=1, set by tests/triton_interp.py before triton is imported).

Small shapes and small tiles (16/32) so every path runs: several query/key blocks, masked and
interior block runs, window skipping, boundary tiles, padded head dims.
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import triton_interp  # noqa: E402,F401  (must precede any triton import)

import pytest  # noqa: E402
import torch  # noqa: E402

from fa3_inductor import reference  # noqa: E402
from fa3_inductor.codegen import triton_render  # noqa: E402
from fa3_inductor.codegen.triton_configs import BwdConfig, FwdConfig  # noqa: E402
from fa3_inductor.ops import rng, triton_impl  # noqa: E402
from fa3_inductor.spec import AttentionSpec  # noqa: E402

FWD_CFG = FwdConfig(16, 16, 4, 1)
BWD_CFG = BwdConfig(16, 16, 16, 16, 4, 1)


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    old = os.environ.get("FA3_INDUCTOR_CACHE")
    os.environ["FA3_INDUCTOR_CACHE"] = str(tmp_path_factory.mktemp("fa3cache"))
    yield
    if old is None:
        os.environ.pop("FA3_INDUCTOR_CACHE", None)
    else:
        os.environ["FA3_INDUCTOR_CACHE"] = old


def _inputs(B, H, HK, Sq, Sk, D, Dv=None, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, HK, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, HK, Sk, Dv, generator=g).to(dtype)
    return q, k, v


def _close(name, got, want, atol, rtol=2e-2):
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not torch.isnan(got).any() or torch.isnan(want).any(), f"{name}: NaN where the reference has none"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _check(spec, q, k, v, *, bias=None, key_padding=None, alibi=None, seed=None, scale=None,
           backward=True, bias_grad=False, fwd_cfg=FWD_CFG, bwd_cfg=BWD_CFG):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    args = (bias, key_padding, alibi, seed, scale, spec)
    out, lse = triton_impl.forward(q, k, v, *args, config=fwd_cfg)
    r_out, r_lse = reference.forward(q, k, v, *args)
    assert out.dtype == spec.out_torch_dtype and out.is_contiguous()
    _close("out", out, r_out, atol=2e-3 if q.dtype == torch.float16 else 1.6e-2)
    _close("lse", lse, r_lse, atol=1e-3, rtol=1e-4)
    if not backward:
        return
    g = torch.Generator().manual_seed(123)
    dout = torch.randn(out.shape, generator=g).to(q.dtype)
    # Both backwards get the same out/lse (the reference's), so only the backward is compared.
    got = triton_impl.backward(dout, q, k, v, r_out.to(q.dtype), r_lse, *args[:-1], spec, bias_grad,
                               config=bwd_cfg)
    want = reference.backward(dout, q, k, v, r_out.to(q.dtype), r_lse, *args[:-1], spec, bias_grad)
    tol = 4e-3 if q.dtype == torch.float16 else 3e-2
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
        assert a.dtype == b.dtype
        _close(name, a, b, atol=tol * max(1.0, b.abs().max().item() / 4))
    if bias_grad and spec.mask_kind == "additive":
        _close("dbias", got[3], want[3], atol=2e-3)
    else:
        assert got[3].numel() == 0


# ---- structure: causal, windows, GQA, odd sizes ------------------------------------------

@pytest.mark.parametrize("Sq,Sk", [(37, 45), (45, 29), (1, 17), (17, 1)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal(Sq, Sk, align):
    q, k, v = _inputs(1, 2, 2, Sq, Sk, 32)
    _check(AttentionSpec(window_right=0, align=align), q, k, v)


@pytest.mark.parametrize("wl,wr,align", [(5, 3, "top_left"), (7, 0, "bottom_right"), (20, None, "top_left"),
                                         (None, 9, "bottom_right"), (0, 0, "top_left")])
def test_window(wl, wr, align):
    q, k, v = _inputs(1, 2, 1, 41, 53, 32)
    _check(AttentionSpec(window_left=wl, window_right=wr, align=align), q, k, v)


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.25])
@pytest.mark.parametrize("causal", [False, True])
def test_scale_sign(scale, causal):
    # Plain scores fold a positive scale into the exponent (FOLD_SCALE: row max of the raw q.k);
    # a zero or negative scale must take the unfolded path (max(c * qk) != c * max(qk) there).
    q, k, v = _inputs(1, 2, 2, 33, 47, 32)
    _check(AttentionSpec(window_right=0 if causal else None), q, k, v, scale=scale, backward=False)


def test_window_dead_rows():
    # bottom_right causal with Sq > Sk: the first rows see no key -> out 0, lse -inf, no NaN.
    q, k, v = _inputs(1, 2, 2, 40, 20, 32)
    spec = AttentionSpec(window_right=0, align="bottom_right")
    out, lse = triton_impl.forward(q, k, v, None, None, None, None, 0.2, spec, config=FWD_CFG)
    assert torch.isneginf(lse[:, :, :20]).all() and (out[:, :, :20] == 0).all()
    _check(spec, q, k, v)


@pytest.mark.parametrize("mapping", ["div", "mod"])
@pytest.mark.parametrize("splits", ["per_query_head", "whole_group"])
def test_gqa(mapping, splits, monkeypatch):
    """dK/dV of a GQA group: one program per query head (small grids: fp32 partials summed on the
    host) or one per kv head looping over the group (grids that fill the machine)."""
    if splits == "whole_group":
        monkeypatch.setattr(triton_impl, "gqa_splits", lambda programs, group, device: 1)
    else:
        assert triton_impl.gqa_splits(4, 3, torch.device("cpu")) == 3
    q, k, v = _inputs(1, 6, 2, 33, 35, 32)
    _check(AttentionSpec(gqa_mapping=mapping, window_right=0), q, k, v)


@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (48, 96)])
def test_head_dims(D, Dv):
    q, k, v = _inputs(1, 2, 1, 19, 27, D, Dv)
    _check(AttentionSpec(), q, k, v)


@pytest.mark.slow
def test_head_dim_128_multi_block():
    q, k, v = _inputs(1, 2, 2, 70, 90, 128)
    _check(AttentionSpec(window_right=0, align="bottom_right"), q, k, v,
           fwd_cfg=FwdConfig(32, 16, 4, 1), bwd_cfg=BwdConfig(16, 32, 32, 16, 4, 1))


def test_bf16_and_out_dtype():
    q, k, v = _inputs(1, 2, 2, 23, 31, 32, dtype=torch.bfloat16)
    _check(AttentionSpec(out_dtype="bfloat16"), q, k, v)
    q, k, v = _inputs(1, 2, 2, 23, 31, 32)
    _check(AttentionSpec(out_dtype="float32"), q, k, v, backward=False)


def test_strided_inputs():
    # [B, S, H, D] storage viewed as [B, H, S, D] (what a model's transpose(1, 2) gives).
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(2, 2, 2, 21, 26, 32))
    _check(AttentionSpec(window_right=0), q, k, v)


@pytest.mark.parametrize("lpt", [False, True])
@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(window_right=0, align="bottom_right"),
                                  AttentionSpec(window_left=6, window_right=2, gqa_mapping="mod")],
                         ids=["dense", "causal_br", "window_gqa"])
def test_tma_lpt_forward(spec, lpt):
    """The TMA-descriptor forward (zero fill past Sq, Sk and the padded head dim) and the
    longest-first query-block order, on strided [B,S,H,D] inputs."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _inputs(2, 4, 2, 37, 45, 24))
    assert triton_impl._tma_ok(q, k, v)
    _check(spec, q, k, v, backward=False, fwd_cfg=FwdConfig(16, 16, 4, 1, True, lpt))
    plans = list(triton_impl._TL_PLANS.values())
    assert plans and all(p.descs is not None for p in plans)       # launched with descriptors


def test_tma_falls_back_to_pointers():
    """Strides TMA rejects (not 16-byte multiples) take the pointer path with the same answer;
    tensor operands (key padding) keep their pointer loads next to the descriptor loads."""
    q, k, v = _inputs(1, 2, 2, 21, 26, 20)           # row stride 40 bytes: no descriptor
    assert not triton_impl._tma_ok(q, k, v)
    _check(AttentionSpec(window_right=0), q, k, v, backward=False, fwd_cfg=FwdConfig(16, 16, 4, 1, True, True))
    assert all(p.descs is None for p in triton_impl._TL_PLANS.values())   # the pointer path
    q, k, v = _inputs(2, 2, 2, 21, 26, 32)
    kp = torch.ones(2, 26, dtype=torch.bool)
    kp[1, 20:] = False
    _check(AttentionSpec(key_padding=True), q, k, v, key_padding=kp, backward=False,
           fwd_cfg=FwdConfig(16, 16, 4, 1, True))


@pytest.mark.parametrize("spec", [AttentionSpec(window_right=0, align="bottom_right", gqa_mapping="mod"),
                                  AttentionSpec(softcap=20.0, window_left=5, window_right=3)], ids=["causal_gqa", "softcap_window"])
def test_atomic_dq_backward(spec):
    """config.deterministic_backward = False: dQ summed by atomics inside the dK/dV kernel (no dQ
    kernel), against the reference, with a padded head dim and odd lengths."""
    from fa3_inductor import config
    q, k, v = _inputs(1, 4, 2, 37, 45, 24)
    with config.patch(deterministic_backward=False):
        _check(spec, q, k, v)


def test_atomic_dq_from_the_sites_compile_setting(monkeypatch):
    """A site compiled with deterministic_backward=False (AttentionSpec.deterministic_backward)
    takes the atomic dQ path whatever the global config says when the backward runs; True
    keeps the dQ kernel under a global False."""
    from fa3_inductor import config
    q, k, v = _inputs(1, 2, 2, 37, 45, 32)
    launched = []
    real = triton_render.load

    class Recorder:  # the rendered backward module, noting which kernels are launched
        def __init__(self, mod):
            self._mod = mod

        def __getattr__(self, name):
            if name.startswith("attn_bwd_"):
                launched.append(name)
            return getattr(self._mod, name)

    def spy(kind, spec, **kw):
        mod = real(kind, spec, **kw)
        return Recorder(mod) if kind == "bwd" else mod
    monkeypatch.setattr(triton_render, "load", spy)
    _check(AttentionSpec(window_right=0, deterministic_backward=False), q, k, v)
    assert "attn_bwd_dq" not in launched, launched
    launched.clear()
    with config.patch(deterministic_backward=False):
        _check(AttentionSpec(window_right=0, deterministic_backward=True), q, k, v)
    assert "attn_bwd_dq" in launched, launched


# ---- one-launch backward (BwdConfig.fused) -------------------------------------------------
# dK/dV programs and dQ programs in one grid.  Key tile 32 and query tile 32 against 16-row /
# 16-key steps, so the grid's two halves have different sizes and every program runs several
# steps; each case also checks that the one launch gives bitwise the separate kernels' results.
FUSED_CFG = BwdConfig(16, 32, 32, 16, 4, 1, fused=True)


def _check_fused(spec, q, k, v, **kw):
    _check(spec, q, k, v, bwd_cfg=FUSED_CFG, **kw)
    scale = q.shape[-1] ** -0.5
    args = (kw.get("bias"), kw.get("key_padding"), kw.get("alibi"), kw.get("seed"), scale, spec)
    out, lse = reference.forward(q, k, v, *args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(q.dtype)
    runs = [triton_impl.backward(dout, q, k, v, out.to(q.dtype), lse, *args[:-1], spec, kw.get("bias_grad", False),
                                 config=dataclasses.replace(FUSED_CFG, fused=fused)) for fused in (True, False)]
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *runs):
        assert torch.equal(a, b), f"{name}: the fused launch differs from the separate kernels"


@pytest.mark.parametrize("Sq,Sk,align", [(37, 45, "top_left"), (45, 29, "bottom_right"), (1, 17, "top_left"),
                                         (40, 20, "bottom_right")])
def test_fused_causal(Sq, Sk, align):
    q, k, v = _inputs(1, 2, 2, Sq, Sk, 24)   # padded head dim; (40, 20): dead rows
    _check_fused(AttentionSpec(window_right=0, align=align), q, k, v)


def test_fused_window_alibi_softcap():
    q, k, v = _inputs(1, 4, 2, 41, 53, 32)
    _check_fused(AttentionSpec(window_left=7, window_right=3, alibi="abs", softcap=6.0, gqa_mapping="mod"),
                 q, k, v, alibi=torch.tensor([0.5, 0.25, 0.125, 0.0625]))


def _padding_bias_case():
    """(spec, q, k, v, operands): key padding and an additive bias whose gradient is wanted."""
    B, H, Sq, Sk = 2, 2, 25, 34
    q, k, v = _inputs(B, H, H, Sq, Sk, 32)
    kp = torch.ones(B, Sk, dtype=torch.bool)
    kp[1, 21:] = False
    bias = torch.randn(B, H, Sq, Sk, generator=torch.Generator().manual_seed(9))
    spec = AttentionSpec(mask_kind="additive", key_padding=True, window_right=0, align="bottom_right")
    return spec, q, k, v, dict(bias=bias, key_padding=kp, bias_grad=True)


def test_fused_padding_bias_dbias():
    spec, q, k, v, operands = _padding_bias_case()
    _check_fused(spec, q, k, v, **operands)


def test_fused_dropout():
    q, k, v = _inputs(1, 2, 1, 26, 35, 32)
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64)
    _check_fused(AttentionSpec(dropout_p=0.3, window_right=0, gqa_mapping="mod"), q, k, v, seed=seed)


@pytest.mark.parametrize("mapping", ["div", "mod"])
@pytest.mark.parametrize("splits", ["per_query_head", "whole_group"])
def test_fused_gqa(mapping, splits, monkeypatch):
    """The dQ half walks the query heads of its split: all of the group (one split) or one each."""
    if splits == "whole_group":
        monkeypatch.setattr(triton_impl, "gqa_splits", lambda programs, group, device: 1)
    q, k, v = _inputs(2, 6, 2, 33, 35, 32)
    _check_fused(AttentionSpec(gqa_mapping=mapping, window_right=0), q, k, v)


def test_fused_odd_sizes_bf16():
    q, k, v = _inputs(1, 3, 1, 19, 27, 80, 48, dtype=torch.bfloat16)
    _check_fused(AttentionSpec(), q, k, v)


def test_fused_ignored_by_atomic_dq():
    """deterministic_backward = False has no dQ kernel to fuse: the flag changes nothing there."""
    from fa3_inductor import config
    q, k, v = _inputs(1, 4, 2, 37, 45, 24)
    with config.patch(deterministic_backward=False):
        _check(AttentionSpec(window_right=0), q, k, v, bwd_cfg=FUSED_CFG)


# ---- score modifications -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "abs"])
def test_alibi(kind):
    q, k, v = _inputs(1, 4, 2, 29, 37, 32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    _check(AttentionSpec(alibi=kind, window_right=0, align="bottom_right"), q, k, v, alibi=slopes)


def test_softcap():
    q, k, v = _inputs(1, 2, 2, 27, 33, 32)
    q = q * 4  # large scores so the cap matters
    _check(AttentionSpec(softcap=5.0), q, k, v)


@pytest.mark.parametrize("shape", ["full", "batch_key", "head_query"])
def test_additive_bias(shape):
    B, H, Sq, Sk = 2, 2, 25, 34
    q, k, v = _inputs(B, H, H, Sq, Sk, 32)
    g = torch.Generator().manual_seed(7)
    if shape == "full":
        bias = torch.randn(B, H, Sq, Sk, generator=g)
    elif shape == "batch_key":   # padding-style [B, 1, 1, Sk] with -inf entries, expanded
        base = torch.zeros(B, 1, 1, Sk)
        base[1, :, :, 30:] = float("-inf")
        bias = base.expand(B, H, Sq, Sk)
    else:                         # [1, H, Sq, Sk] relative-position style, fp16, expanded
        bias = torch.randn(1, H, Sq, Sk, generator=g).half().expand(B, H, Sq, Sk)
    _check(AttentionSpec(mask_kind="additive"), q, k, v, bias=bias, bias_grad=(shape == "full"))


def test_additive_bias_grad_with_window():
    q, k, v = _inputs(1, 2, 2, 33, 33, 32)
    bias = torch.randn(1, 2, 33, 33)
    _check(AttentionSpec(mask_kind="additive", window_right=0, window_left=8), q, k, v,
           bias=bias, bias_grad=True)


def test_bool_mask_broadcast():
    B, H, Sq, Sk = 2, 2, 27, 31
    q, k, v = _inputs(B, H, 1, Sq, Sk, 32)
    g = torch.Generator().manual_seed(3)
    m = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
    m[0, 0, 5] = False  # one fully masked row -> out 0, lse -inf
    _check(AttentionSpec(mask_kind="bool"), q, k, v, bias=m.expand(B, H, Sq, Sk))


def test_key_padding():
    B, H, Sq, Sk = 3, 2, 22, 37
    q, k, v = _inputs(B, H, H, Sq, Sk, 32)
    kp = torch.ones(B, Sk, dtype=torch.bool)
    kp[1, 20:] = False
    kp[2, :] = False  # a batch with every key padded: dead rows everywhere
    _check(AttentionSpec(key_padding=True, window_right=0, align="bottom_right"), q, k, v, key_padding=kp)


# ---- dropout -----------------------------------------------------------------------------

def test_dropout_bitwise_mask():
    B, H, Sq, Sk = 1, 2, 26, 35
    q, k, v = _inputs(B, H, 1, Sq, Sk, 32)
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64)
    _check(AttentionSpec(dropout_p=0.3, window_right=0, gqa_mapping="mod"), q, k, v, seed=seed)


def test_dropout_threshold_exact():
    # keep iff u >= float32(p): the integer threshold used by the kernels agrees everywhere.
    for p in (0.1, 0.3, 0.5, 1e-7, 0.999):
        t = triton_render.dropout_threshold(p)
        u_lo = torch.tensor([(t - 1) * 2.0 ** -24, t * 2.0 ** -24], dtype=torch.float32)
        assert (u_lo >= p).tolist() == [False, True]
    assert rng.uniform is not None


# ---- combined + rendering ----------------------------------------------------------------

@pytest.mark.slow
def test_everything_at_once():
    B, H, HK, Sq, Sk = 2, 4, 2, 45, 52
    q, k, v = _inputs(B, H, HK, Sq, Sk, 80)
    kp = torch.ones(B, Sk, dtype=torch.bool)
    kp[0, 40:] = False
    bias = torch.randn(1, H, Sq, Sk).expand(B, H, Sq, Sk)
    spec = AttentionSpec(window_left=16, window_right=2, align="bottom_right", softcap=8.0, alibi="abs",
                         mask_kind="additive", key_padding=True, gqa_mapping="div", dropout_p=0.2)
    _check(spec, q, k, v, bias=bias, key_padding=kp, alibi=torch.rand(H),
           seed=torch.tensor([5, 6], dtype=torch.int64), bias_grad=False)


def test_render_only_needed_code():
    plain = triton_render.render_source("fwd", AttentionSpec())
    assert "HAS_DROPOUT = tl.constexpr(False)" in plain and "tl.load(Bias_bh" not in plain
    rich = triton_render.render_source("bwd", AttentionSpec(mask_kind="additive", softcap=3.0), dbias=True)
    assert "WRITE_DBIAS = tl.constexpr(True)" in rich and "_tanh(qk" in rich
    compile(plain, "fwd", "exec")
    compile(rich, "bwd", "exec")


# ---- even-length specialisation (EVEN_M / EVEN_N launch constexprs) -----------------------
# Lengths that the tiles divide compile the seqlen bound checks out (loads, stores, the key
# boundary of the score rule).  Each case runs against the reference, checks which flags the
# launches got, and checks bitwise equality with the same launch with the switch off
# (triton_configs.no_even_specialisation: every bound check kept).  The odd lengths of the same
# spec (one side even, the other not, or a length only one of the backward's tiles divides)
# take the mixed paths.
EVEN_FWD = FwdConfig(128, 64, 4, 1)
EVEN_BWD = BwdConfig(64, 128, 128, 64, 4, 1)


def _check_even(spec, q, k, v, *, fwd_cfg=EVEN_FWD, bwd_cfg=EVEN_BWD, monkeypatch, **kw):
    from fa3_inductor.codegen import triton_configs
    flags = []
    even = triton_configs.even
    monkeypatch.setattr(triton_configs, "even", lambda size, *t: flags.append(even(size, *t)) or flags[-1])
    triton_impl.clear_plans()   # the flags are decided when a signature's launch plan is built
    _check(spec, q, k, v, fwd_cfg=fwd_cfg, bwd_cfg=bwd_cfg, **kw)
    seen, flags[:] = list(flags), []
    scale = q.shape[-1] ** -0.5
    args = (kw.get("bias"), kw.get("key_padding"), kw.get("alibi"), kw.get("seed"), scale, spec)
    out, lse = reference.forward(q, k, v, *args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(q.dtype)

    def run():
        f = triton_impl.forward(q, k, v, *args, config=fwd_cfg)
        b = triton_impl.backward(dout, q, k, v, out.to(q.dtype), lse, *args[:-1], spec, kw.get("bias_grad", False),
                                 config=bwd_cfg)
        return (*f, *b)
    on = run()
    with triton_configs.no_even_specialisation():
        off = run()
    assert not any(flags[len(flags) // 2:]), "the switch did not turn the specialisation off"
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), on, off):
        assert torch.equal(a, b), f"{name}: the even-length kernels differ from the bound-checked ones"
    return seen


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(window_right=0),
                                  AttentionSpec(window_right=0, align="bottom_right", gqa_mapping="mod")],
                         ids=["dense", "causal", "causal_br_gqa"])
def test_even_lengths(spec, fused, monkeypatch):
    q, k, v = _inputs(1, 4, 2, 256, 256, 32)
    cfg = dataclasses.replace(EVEN_BWD, fused=fused)
    assert all(_check_even(spec, q, k, v, bwd_cfg=cfg, monkeypatch=monkeypatch))


@pytest.mark.parametrize("Sq,Sk,want", [(256, 200, "m"), (200, 256, "n"), (192, 192, "m1n2"), (1, 17, "")],
                         ids=["even_q", "even_k", "one_tile_divides", "tiny"])
def test_even_mixed_lengths(Sq, Sk, want, monkeypatch):
    """Only one side even, or a length that BLOCK_M1 = 64 divides and BLOCK_M2 = 128 does not:
    each launch gets its own flags (dK/dV even rows, dQ not), the fused one the conjunction."""
    from fa3_inductor.codegen import triton_configs
    q, k, v = _inputs(1, 4, 2, Sq, Sk, 32)
    spec = AttentionSpec(window_left=70, window_right=0, align="bottom_right")
    seen = _check_even(spec, q, k, v, monkeypatch=monkeypatch)
    # forward (m, n), dK/dV (m1, n1), dQ (m2, n2)
    assert seen == [triton_configs.even(Sq, 128), triton_configs.even(Sk, 64), triton_configs.even(Sq, 64),
                    triton_configs.even(Sk, 128), triton_configs.even(Sq, 128), triton_configs.even(Sk, 64)]
    assert any(seen) == bool(want)
    seen = _check_even(spec, q, k, v, bwd_cfg=dataclasses.replace(EVEN_BWD, fused=True), monkeypatch=monkeypatch)
    assert seen[2:] == [triton_configs.even(Sq, 64, 128), triton_configs.even(Sk, 128, 64)]


@pytest.mark.parametrize("Sq,Sk", [(128, 256), (120, 250)])
def test_even_padding_bias_dbias(Sq, Sk, monkeypatch):
    B, H = 2, 2
    q, k, v = _inputs(B, H, H, Sq, Sk, 32)
    kp = torch.ones(B, Sk, dtype=torch.bool)
    kp[1, 180:] = False
    bias = torch.randn(B, H, Sq, Sk, generator=torch.Generator().manual_seed(9))
    spec = AttentionSpec(mask_kind="additive", key_padding=True, window_right=0, align="bottom_right")
    for fused in (False, True):
        _check_even(spec, q, k, v, bias=bias, key_padding=kp, bias_grad=True, monkeypatch=monkeypatch,
                    bwd_cfg=dataclasses.replace(EVEN_BWD, fused=fused))


@pytest.mark.parametrize("Sq,Sk", [(128, 128), (100, 128)])
def test_even_bool_mask_dropout(Sq, Sk, monkeypatch):
    B, H = 1, 2
    q, k, v = _inputs(B, H, 1, Sq, Sk, 32)
    m = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(3)) > 0.3
    _check_even(AttentionSpec(mask_kind="bool"), q, k, v, bias=m.expand(B, H, Sq, Sk), monkeypatch=monkeypatch)
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64)
    _check_even(AttentionSpec(dropout_p=0.3, window_right=0, gqa_mapping="mod"), q, k, v, seed=seed,
                monkeypatch=monkeypatch)


def test_even_atomic_dq_padded_head_dim(monkeypatch):
    """Atomic dQ rows and a padded head dim (D = 24 in 32 lanes: those masks stay) at even lengths."""
    from fa3_inductor import config
    q, k, v = _inputs(1, 4, 2, 128, 256, 24)
    with config.patch(deterministic_backward=False):
        _check(AttentionSpec(window_right=0, align="bottom_right", gqa_mapping="mod"), q, k, v,
               fwd_cfg=EVEN_FWD, bwd_cfg=EVEN_BWD)
    _check_even(AttentionSpec(softcap=20.0, window_left=40, window_right=3), q, k, v, monkeypatch=monkeypatch)


def test_even_flags():
    from fa3_inductor.codegen import triton_configs
    assert triton_configs.even(4096, 64, 128) and not triton_configs.even(4000, 64, 128)
    assert triton_configs.even(192, 64) and not triton_configs.even(192, 64, 128)
    with triton_configs.no_even_specialisation():
        assert not triton_configs.even(4096, 64)
    assert triton_configs.even(4096, 64)
    src = triton_render.render_source("bwd", AttentionSpec(window_right=0, key_padding=True))
    assert "if not EVEN_N:\n            keep = keep & (j < Sk)" in src


# ---- TMA-descriptor backward (BwdConfig.tma) ----------------------------------------------
# Q, K, V, dO through 4-D tensor descriptors: TMA's zero fill past Sq / Sk / the head dim stands
# in for the masked pointer loads, so the loaded tiles, and with them every result, are the
# pointer backward's bit for bit.  Each case runs against the reference (_check), checks that
# descriptors were built (no silent pointer fallback) and compares bitwise with the pointer
# loads at the same tiles.  Query tiles 16 (dK/dV) and 32 (dQ) and key tiles 32 / 16: the
# fused kernel's two halves need descriptors of different block shapes.
TMA_BWD = BwdConfig(16, 32, 32, 16, 4, 1, tma=True)


def _check_tma_bwd(spec, q, k, v, monkeypatch, *, fused, cfg=TMA_BWD, against_reference=True, dout_fn=None,
                   expect_tma=True, **kw):
    """dout_fn: the layout of the dO the bitwise comparison hands in (e.g. strided views)."""
    cfg = dataclasses.replace(cfg, fused=fused)
    if against_reference:
        _check(spec, q, k, v, bwd_cfg=cfg, **kw)
    built = []
    real = triton_impl._bwd_descriptors
    monkeypatch.setattr(triton_impl, "_bwd_descriptors", lambda *a: built.append(a[4:6]) or real(*a))
    triton_impl.clear_plans()   # descriptors are worked out when a signature's plan is built
    scale = q.shape[-1] ** -0.5
    args = (kw.get("bias"), kw.get("key_padding"), kw.get("alibi"), kw.get("seed"), scale, spec)
    out, lse = reference.forward(q, k, v, *args)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    if dout_fn is not None:
        dout = dout_fn(dout)
    runs = [triton_impl.backward(dout, q, k, v, out.to(q.dtype), lse, *args[:-1], spec, kw.get("bias_grad", False),
                                 config=dataclasses.replace(cfg, tma=tma)) for tma in (True, False)]
    # The tiles of the descriptors built: (block_m1, block_n1) for the dK/dV kernel or half,
    # (block_m2, block_n2) for the dQ kernel or half.
    if expect_tma:
        assert set(built) == {(cfg.block_m1, cfg.block_n1), (cfg.block_m2, cfg.block_n2)}, built
    else:
        assert built == [], "descriptors built for strides TMA cannot take"
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *runs):
        assert torch.equal(a, b), f"{name}: the TMA backward differs from the pointer loads"


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("Sq,Sk,align", [(37, 45, "top_left"), (45, 29, "bottom_right"), (40, 20, "bottom_right")])
def test_tma_backward_causal(Sq, Sk, align, fused, monkeypatch):
    q, k, v = _inputs(1, 2, 2, Sq, Sk, 24)   # D 24 padded to 32: TMA fills lanes 24..31 with zeros
    _check_tma_bwd(AttentionSpec(window_right=0, align=align), q, k, v, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("wl,wr,align", [(5, 3, "top_left"), (7, 0, "bottom_right"), (None, 9, "bottom_right")])
def test_tma_backward_window(wl, wr, align, fused, monkeypatch):
    q, k, v = _inputs(1, 2, 1, 41, 53, 32)
    _check_tma_bwd(AttentionSpec(window_left=wl, window_right=wr, align=align), q, k, v, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("mapping", ["div", "mod"])
@pytest.mark.parametrize("splits", ["per_query_head", "whole_group"])
def test_tma_backward_gqa(mapping, splits, fused, monkeypatch):
    """The dK/dV program's head loop loads Q, dO of each query head of its group through the one
    descriptor; per-query-head splits write fp32 partials (pointer stores)."""
    if splits == "whole_group":
        monkeypatch.setattr(triton_impl, "gqa_splits", lambda programs, group, device: 1)
    q, k, v = _inputs(2, 6, 2, 33, 35, 32)
    _check_tma_bwd(AttentionSpec(gqa_mapping=mapping, window_right=0), q, k, v, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_tma_backward_padding_bias_dbias(fused, monkeypatch):
    """Key padding and an additive bias with its gradient: tensor operands keep their pointer
    loads (and dBias its pointer stores) next to the descriptor loads."""
    spec, q, k, v, operands = _padding_bias_case()
    _check_tma_bwd(spec, q, k, v, monkeypatch, fused=fused, **operands)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_tma_backward_dropout_softcap(fused, monkeypatch):
    q, k, v = _inputs(1, 2, 1, 26, 35, 32)
    seed = torch.tensor([123456789, 987654321], dtype=torch.int64)
    _check_tma_bwd(AttentionSpec(dropout_p=0.3, window_right=0, gqa_mapping="mod"), q, k, v, monkeypatch,
                   fused=fused, seed=seed)
    q, k, v = _inputs(1, 2, 2, 27, 33, 32)
    _check_tma_bwd(AttentionSpec(softcap=5.0, window_left=9, window_right=2), q * 4, k, v, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("Sq,Sk", [(17, 113), (113, 17)])
def test_tma_backward_odd_lengths(Sq, Sk, fused, monkeypatch):
    q, k, v = _inputs(1, 2, 1, Sq, Sk, 24)
    _check_tma_bwd(AttentionSpec(window_right=0, align="bottom_right"), q, k, v, monkeypatch, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (48, 96)])
def test_tma_backward_head_dims(D, Dv, fused, monkeypatch):
    """d64, a padded d80 (128 lanes), and dV != d (the dO / V descriptors take DV_PAD)."""
    q, k, v = _inputs(1, 2, 1, 19, 27, D, Dv)
    _check_tma_bwd(AttentionSpec(), q, k, v, monkeypatch, fused=fused)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_tma_backward_head_dim_128(fused, monkeypatch):
    q, k, v = _inputs(1, 2, 2, 70, 90, 128)
    _check_tma_bwd(AttentionSpec(window_right=0, align="bottom_right"), q, k, v, monkeypatch, fused=fused,
                   cfg=BwdConfig(16, 32, 32, 16, 4, 1, tma=True), fwd_cfg=FwdConfig(32, 16, 4, 1))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_tma_backward_strided_bf16(fused, monkeypatch):
    """[B, S, H, D] storage viewed as [B, H, S, D] (strides in any order are fine for TMA), bf16."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in _inputs(2, 4, 2, 21, 26, 32, dtype=torch.bfloat16))
    _check_tma_bwd(AttentionSpec(window_right=0, gqa_mapping="mod", out_dtype="bfloat16"), q, k, v, monkeypatch,
                   fused=fused, dout_fn=lambda d: d.transpose(1, 2).contiguous().transpose(1, 2))


def test_tma_backward_atomic_dq(monkeypatch):
    """deterministic_backward = False: the dK/dV kernel's descriptor loads next to its dQ atomics."""
    from fa3_inductor import config
    q, k, v = _inputs(1, 4, 2, 37, 45, 24)
    built = []
    real = triton_impl._bwd_descriptors
    monkeypatch.setattr(triton_impl, "_bwd_descriptors", lambda *a: built.append(a[4:6]) or real(*a))
    with config.patch(deterministic_backward=False):
        _check(AttentionSpec(window_right=0, align="bottom_right", gqa_mapping="mod"), q, k, v, bwd_cfg=TMA_BWD)
    assert built == [(16, 32)]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_tma_backward_falls_back_to_pointers(fused, monkeypatch):
    """Strides TMA rejects take the pointer loads, with the same answer: a 40-byte row stride
    (D = 20), and a dO expanded over heads (stride 0, as autograd hands out for a broadcast
    gradient)."""
    q, k, v = _inputs(1, 2, 2, 21, 26, 20)
    assert not triton_impl._tma_ok(q, k, v)
    _check_tma_bwd(AttentionSpec(window_right=0), q, k, v, monkeypatch, fused=fused, expect_tma=False)
    q, k, v = _inputs(1, 2, 2, 21, 26, 32)
    _check_tma_bwd(AttentionSpec(window_right=0), q, k, v, monkeypatch, fused=fused, expect_tma=False,
                   against_reference=False, dout_fn=lambda d: d[:, :1].expand(d.shape))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("Sq,Sk", [(128, 256), (120, 250)])
def test_tma_backward_even_lengths(Sq, Sk, fused, monkeypatch):
    """EVEN_M / EVEN_N with descriptor loads: the even launches (no bound checks left but the
    spec's) equal the bound-checked ones and the reference; odd lengths take TMA's zero fill."""
    q, k, v = _inputs(1, 4, 2, Sq, Sk, 32)
    cfg = dataclasses.replace(EVEN_BWD, fused=fused, tma=True)
    spec = AttentionSpec(window_left=70, window_right=0, align="bottom_right", gqa_mapping="mod")
    seen = _check_even(spec, q, k, v, bwd_cfg=cfg, monkeypatch=monkeypatch)
    assert all(seen) == (Sq % 128 == 0 and Sk % 128 == 0)
    _check_tma_bwd(spec, q, k, v, monkeypatch, fused=fused, cfg=cfg, against_reference=False)


def test_tma_backward_config_key():
    from fa3_inductor.codegen import triton_configs
    base = triton_configs.default_bwd(64, 64, False)
    assert not base.tma and "tma" not in base.key()
    assert dataclasses.replace(base, tma=True).key() == base.key() + "_tma"
    for d in (64, 128, 256):
        for causal in (False, True):
            cands = triton_configs.bwd_candidates(d, d, causal)
            default = triton_configs.default_bwd(d, d, causal)
            # measured on the H100 (session 5): TMA loads won only at d128 non-causal
            assert default.tma == (d == 128 and not causal)
            assert dataclasses.replace(default, tma=True) in cands
            assert len({c.key() for c in cands}) == len(cands)


def test_forward_plan_per_call_signature(monkeypatch):
    """The tl forward builds one launch plan per call signature (the tile config looked up once)
    and runs it with each call's own tensors (an int32 mask becomes the same uint8 operand as the
    bool one: the same plan); a key padding mask in other strides is another signature."""
    calls = []
    real = triton_impl._fwd_config
    monkeypatch.setattr(triton_impl, "_fwd_config", lambda *a: calls.append(1) or real(*a))
    spec = AttentionSpec(window_right=0, key_padding=True)
    q, k, v = _inputs(2, 4, 2, 37, 45, 32)
    kp = torch.ones(2, 45, dtype=torch.bool)
    kp[1, 30:] = False
    for s, mask in ((1.0, kp), (0.5, kp.to(torch.int32))):
        out, lse = triton_impl.forward(q * s, k, v, None, mask, None, None, 0.2, spec)
        r_out, r_lse = reference.forward(q * s, k, v, None, mask, None, None, 0.2, spec)
        _close("out", out, r_out, atol=2e-3)
        _close("lse", lse, r_lse, atol=1e-3, rtol=1e-4)
    assert len(calls) == 1 and len(triton_impl._TL_PLANS) == 1
    kp_cols = kp.t().contiguous().t()          # strides (1, 2)
    out, _ = triton_impl.forward(q, k, v, None, kp_cols, None, None, 0.2, spec)
    assert len(calls) == 2 and len(triton_impl._TL_PLANS) == 2
    _close("out", out, reference.forward(q, k, v, None, kp, None, None, 0.2, spec)[0], atol=2e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_backward_plan_per_call_signature(fused, monkeypatch):
    """The tl backward builds one plan per call signature (its kernels' launches kept) and runs it
    with each call's own tensors and fresh scratch: the second call's gradients are the
    reference's too."""
    built = []
    real = triton_impl._TlBwdPlan.__init__
    monkeypatch.setattr(triton_impl._TlBwdPlan, "__init__", lambda self, *a: built.append(1) or real(self, *a))
    cfg = dataclasses.replace(BWD_CFG, fused=fused)
    spec = AttentionSpec(window_right=0, key_padding=True)
    q, k, v = _inputs(2, 4, 2, 37, 45, 32)
    kp = torch.ones(2, 45, dtype=torch.bool)
    kp[0, 40:] = False
    out, lse = reference.forward(q, k, v, None, kp, None, None, 0.2, spec)
    for s in (1.0, -0.5):
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(q.dtype) * s
        got = triton_impl.backward(dout, q, k, v, out.to(q.dtype), lse, None, kp, None, None, 0.2, spec, False,
                                   config=cfg)
        want = reference.backward(dout, q, k, v, out.to(q.dtype), lse, None, kp, None, None, 0.2, spec, False)
        for name, a, b in zip(("dq", "dk", "dv"), got[:3], want[:3]):
            _close(name, a, b, atol=4e-3)
    assert len(built) == 1
    (plan,) = triton_impl._TL_PLANS.values()
    assert [name for name, *_ in plan.kernels] == (["fused"] if fused else ["dkdv", "dq"])
