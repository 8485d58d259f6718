"""The Gluon forward (ops/gluon_fwd.py, kernels/triton/gluon_fwd.py.tmpl) on CPU: which calls
triton_impl.gluon_supports() routes to it and why not the others, the template's loading and
cache key, explain()'s report, and an AOT compile for sm_90a (no GPU needed) with the
structure the kernel is for: warp specialisation (setmaxnreg), wgmma, 4-D TMA, no spills.
The numerics run on the H100: tests/gpu/test_triton_gpu.py (test_gluon_*)."""
import pytest
import torch

import fa3_inductor
from fa3_inductor import config_check
from fa3_inductor.codegen import triton_configs, triton_render
from fa3_inductor.ops import gluon_fwd, triton_impl
from fa3_inductor.spec import AttentionSpec

CAUSAL = AttentionSpec(window_right=0)


@pytest.fixture
def sm90(monkeypatch):
    """CPU tensors pass the device check (an sm_90 GPU is mocked)."""
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)


def _qkv(B=2, Hq=4, Hk=4, Sq=33, Sk=33, D=128, Dv=None, dtype=torch.float16):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hk, Sk, D, dtype=dtype)
    v = torch.randn(B, Hk, Sk, Dv or D, dtype=dtype)
    return q, k, v


def _why(q, k, v, spec=CAUSAL, bias=None, kp=None, slopes=None, seed=None, **kw):
    return triton_impl.gluon_supports(q, k, v, bias, kp, slopes, seed, spec, **kw)


def test_accepts_the_supported_calls(sm90):
    for D in (128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            out = "float16" if dtype == torch.float16 else "bfloat16"
            for spec in (AttentionSpec(out_dtype=out), AttentionSpec(window_right=0, out_dtype=out),
                         AttentionSpec(window_right=0, align="bottom_right", out_dtype=out)):
                assert _why(*_qkv(D=D, dtype=dtype), spec=spec, scale=0.1) is None
    # GQA 4:1 and 8:1 ("div"), Sq != Sk both ways, length 1
    assert _why(*_qkv(Hq=8, Hk=2, Sq=113, Sk=1000)) is None
    assert _why(*_qkv(Hq=8, Hk=1, Sq=1000, Sk=113)) is None
    assert _why(*_qkv(Sq=1, Sk=1)) is None
    # [B, S, H, D].transpose(1, 2): what HF / nanoGPT models hand over, no copy needed
    q, k, v = (torch.randn(2, 77, 4, 128, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous() and _why(q, k, v) is None


@pytest.mark.parametrize("change,needle", [
    (dict(bias=torch.zeros(2, 4, 33, 33, dtype=torch.float16), spec=AttentionSpec(mask_kind="additive")),
     "additive mask/bias"),
    (dict(bias=torch.ones(2, 4, 33, 33, dtype=torch.bool), spec=AttentionSpec(mask_kind="bool")), "bool mask"),
    (dict(kp=torch.ones(2, 33, dtype=torch.bool), spec=AttentionSpec(key_padding=True)), "key padding"),
    (dict(slopes=torch.ones(4), spec=AttentionSpec(alibi="linear")), "ALiBi"),
    (dict(spec=AttentionSpec(softcap=30.0)), "softcap"),
    (dict(seed=torch.zeros(2, dtype=torch.int64), spec=AttentionSpec(dropout_p=0.1)), "dropout"),
    (dict(spec=AttentionSpec(window_left=16, window_right=0)), "window"),
    (dict(spec=AttentionSpec(window_right=4)), "window"),
    (dict(spec=AttentionSpec(out_dtype="float32")), "out dtype float32"),
    (dict(scale=-0.5), "scale"),
    (dict(config=triton_configs.FwdConfig(128, 64, 8, 2)), "explicit tile config"),
])
def test_rejections_name_the_reason(sm90, change, needle):
    q, k, v = _qkv()
    why = _why(q, k, v, **change)
    assert why is not None and needle in why, why


@pytest.mark.parametrize("shapes,needle", [
    (dict(D=64), "head dims"), (dict(D=96), "head dims"), (dict(D=128, Dv=256), "head dims"),
    (dict(dtype=torch.float32), "dtype"), (dict(Hq=6, Hk=4), "multiple of kv heads"),
])
def test_rejects_shapes_and_dtypes(sm90, shapes, needle):
    why = _why(*_qkv(**shapes), spec=AttentionSpec(out_dtype="float32" if "dtype" in shapes else "float16"))
    assert why is not None and needle in why, why


def test_rejects_mod_gqa_and_non_tma_layouts(sm90):
    q, k, v = _qkv(Hq=8, Hk=2)
    assert "GQA mapping 'mod'" in _why(q, k, v, spec=AttentionSpec(gqa_mapping="mod"))
    assert _why(*_qkv(), spec=AttentionSpec(gqa_mapping="mod")) is None   # no GQA: mapping moot
    # a row stride of 132 elements (264 bytes) is no 16-byte multiple
    q = torch.randn(2, 4, 33, 132, dtype=torch.float16)[..., :128]
    assert "q strides" in _why(q, *_qkv()[1:])
    # base not 16-byte aligned
    k = torch.randn(2 * 4 * 33 * 128 + 1, dtype=torch.float16)[1:].view(2, 4, 33, 128)
    assert "k strides" in _why(_qkv()[0], k, _qkv()[2])
    # an expand()ed K/V (stride 0 over heads) is not TMA-readable
    q, k, v = _qkv(Hk=1)
    assert "k strides" in _why(q, k.expand(2, 4, 33, 128), v.expand(2, 4, 33, 128))
    # ... but a size-1 dim's stride does not matter
    q = torch.randn(1, 33, 4, 128, dtype=torch.float16).permute(0, 2, 1, 3)[:, :1]
    assert gluon_fwd.tma_strides(q) is not None and _why(q, *_qkv(B=1, Hq=1, Hk=1)[1:]) is None


def test_device_switches_autotune_and_overrides(sm90, monkeypatch):
    q, k, v = _qkv()
    with fa3_inductor.config.patch(gluon_forward=False):
        assert "gluon_forward is False" in _why(q, k, v)
    with triton_configs.override(fwd=triton_configs.FwdConfig(128, 64, 8, 2)):
        assert "explicit tile config" in _why(q, k, v)
    from fa3_inductor import autotune
    with autotune.enabled_ctx(True):
        assert "autotune" in _why(q, k, v)
    assert "autotune" in _why(q, k, v, spec=CAUSAL.replace(autotune=True))
    monkeypatch.undo()   # the real device check: CPU tensors
    assert "not CUDA" in _why(q, k, v)


def test_config_switch_is_validated():
    assert fa3_inductor.config.gluon_forward is True
    config_check.check_value("gluon_forward", False)
    with pytest.raises(ValueError, match="gluon_forward"):
        config_check.check_value("gluon_forward", "yes")
    with pytest.raises(ValueError, match="read when the op runs"):   # not a per-compile option
        config_check.split_options({"fa3.gluon_forward": False})


def test_template_loads_and_is_keyed_by_source_and_triton(monkeypatch):
    mod = triton_render.load("gluon_fwd")
    assert hasattr(mod, "attn_fwd_kernel") and mod is triton_render.load("gluon_fwd")
    assert str(triton_render.cache_dir()) in mod.__file__
    text = triton_render.render_source("gluon_fwd", None)
    assert "{{" not in text and "coop" not in text.lower()
    key = triton_render._key("gluon_fwd", None, False)
    monkeypatch.setattr(triton_render, "_triton_version", lambda: "0.0.0")
    assert triton_render._key("gluon_fwd", None, False) != key
    monkeypatch.undo()
    real = triton_render.read_template
    monkeypatch.setattr(triton_render, "read_template", lambda p: real(p) + ("\n# x" if "gluon" in p else ""))
    assert triton_render._key("gluon_fwd", None, False) != key


def test_explain_reports_the_triton_forward(monkeypatch):
    """Where a site's kernel is Triton, explain() says whether the Gluon forward serves it
    (here CPU tensors: the tl kernel, with gluon_supports' reason)."""
    from fa3_inductor import explain
    from fa3_inductor.ops import dispatch

    def attn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.125
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
    monkeypatch.setattr(dispatch, "choose_forward", lambda q, k, v, bias, spec: triton_impl)
    q = torch.randn(2, 2, 8, 128)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    m = rep.matched[0]
    assert m.kernel == "triton" and m.triton_forward == "tl: inputs are not CUDA tensors", m
    assert "[kernel: triton, forward tl: inputs are not CUDA tensors]" in str(rep)
    monkeypatch.setattr(triton_impl, "gluon_supports", lambda *a, **kw: None)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    assert rep.matched[0].triton_forward == "gluon" and "forward gluon]" in str(rep)


@pytest.mark.parametrize("D,causal,dtype", [(128, True, "fp16"), (256, False, "bf16")])
def test_aot_compile_sm90a(D, causal, dtype):
    """The instantiation the JIT would launch, compiled for sm_90a: warp specialised with
    register budgets, wgmma with the P V operand from registers and two groups in flight, 4-D
    TMA, and no spills or local memory in the assembled code."""
    ck = gluon_fwd.aot_compile(D, causal, dtype)
    ptx = ck.asm["ptx"]
    assert "setmaxnreg" in ptx and "wgmma" in ptx
    ev = gluon_fwd.ptx_evidence(ptx)
    assert ("dec", "24") in ev["setmaxnreg"] and ("inc", "240") in ev["setmaxnreg"], ev
    assert ev["wgmma_reg_a"] > 0 and ev["two_groups_in_flight"] and ev["tma_4d"], ev
    assert ".local" not in ptx
    assert ck.metadata.shared <= 227 * 1024
    rep = gluon_fwd.ptxas_report(ptx)
    assert rep["ok"], rep["log"][-2000:]
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0 and not rep["stack"], rep["log"]
    assert rep["sass_local"] == 0 and not rep["serialized_wgmma"], rep
    assert rep["sass_max_reg"] is not None and rep["sass_max_reg"] <= 240, rep
