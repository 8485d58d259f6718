"""explain() output, configuration validation, torch.compile options, the entry point, and the
CPU behaviour without force_rewrite."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fa3_inductor
from fa3_inductor import backend as fa3_backend_mod
from helpers import clear_reports, compile_fa3, describe_reports, explain, matched_entries, rewritten_sites

PY = sys.executable


def qkv(T=8):
    g = torch.Generator().manual_seed(T)
    return tuple(torch.randn(2, 2, T, 8, generator=g) for _ in range(3))


def causal_attention(q, k, v):
    T = q.shape[-2]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v


def two_softmaxes(q, k, v):
    y = causal_attention(q, k, v)
    return y.softmax(dim=-2)


# ---------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------
def test_explain_table_has_source_and_spec():
    rep = explain(causal_attention, *qkv())
    text = str(rep)
    assert len(rep.matched) == 1
    m = rep.matched[0]
    assert "att = F.softmax(att, dim=-1)" in m.source and "test_explain_config.py:" in m.source
    assert m.spec.causal and m.spec.scale_repr.startswith("0.35355")
    assert m.q_shape == (2, 2, 8, 8) and m.k_shape == (2, 2, 8, 8) and m.v_shape == (2, 2, 8, 8)
    assert m.gqa_group == 1
    assert "1 attention site(s) matched" in text
    assert "test_explain_config.py:" in text and "att = F.softmax(att, dim=-1)" in text
    assert "causal=top_left" in text and m.spec.describe() in text
    assert "[2,2,8,8]" in text
    assert repr(rep) == text


def test_explain_unmatched_reason_in_table():
    rep = explain(two_softmaxes, *qkv())
    assert len(rep.matched) == 1 and len(rep.unmatched) == 1
    u = rep.unmatched[0]
    assert "dim" in u.reason and "softmax(dim=-2)" in u.source
    text = str(rep)
    assert "left alone" in text and u.reason in text


def test_explain_cpu_note_and_nothing_compiled():
    rep = explain(causal_attention, *qkv())
    m = rep.matched[0]
    assert m.rewritten_on_this_machine is False
    assert "CPU" in m.note and "force_rewrite" in m.note
    assert "not rewritten here" in str(rep)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep2 = explain(causal_attention, *qkv())
    assert rep2.matched[0].rewritten_on_this_machine is True and rep2.matched[0].note == ""


def test_explain_shows_planned_kernel(monkeypatch):
    """A site rewritten here shows the forward implementation dispatch picks for its example
    tensors (CPU + force_rewrite: the reference); the choice comes from dispatch itself."""
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(causal_attention, *qkv())
    assert rep.matched[0].kernel == "reference" and "[kernel: reference]" in str(rep)
    from fa3_inductor.ops import dispatch, triton_impl
    seen = []
    monkeypatch.setattr(dispatch, "choose_forward", lambda q, k, v, bias, spec: seen.append(
        (tuple(q.shape), tuple(k.shape), bias, spec.causal)) or triton_impl)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(causal_attention, *qkv())
    assert rep.matched[0].kernel == "triton" and seen == [((2, 2, 8, 8), (2, 2, 8, 8), None, True)]


def test_explain_counts_graphs_and_leaves_dynamo_clean():
    def fn(q, k, v):
        a = causal_attention(q, k, v)
        torch._dynamo.graph_break()
        return causal_attention(a, k, v)
    rep = explain(fn, *qkv())
    assert rep.graphs == 2 and len(rep.matched) == 2
    # explain resets Dynamo: a later compile starts fresh
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(causal_attention)(*qkv())
    torch.testing.assert_close(out, causal_attention(*qkv()), atol=1e-5, rtol=1e-5)


def test_explain_module_with_kwargs():
    class M(torch.nn.Module):
        def forward(self, q, k, v, scale=0.5):
            return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v
    q, k, v = qkv()
    rep = explain(M(), q, k, v=v, scale=0.25)
    assert len(rep.matched) == 1 and float(rep.matched[0].spec.scale_repr) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------
def _value_error(exc):
    """Dynamo wraps backend errors in BackendCompilerFailed: find the ValueError inside."""
    seen = 0
    while exc is not None and not isinstance(exc, ValueError) and seen < 10:
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
        seen += 1
    return exc


@pytest.mark.parametrize("name,value", [("kernel", "x"), ("sdpa_rewrite", "sometimes"), ("force_rewrite", "yes"),
                                        ("fp8", 1), ("min_train_attention_flops", -1.0),
                                        ("min_train_attention_flops", "big")])
def test_bad_config_value_named_at_compile(name, value):
    setattr(fa3_inductor.config, name, value)  # the autouse fixture restores it
    with pytest.raises(Exception) as ei:
        torch.compile(causal_attention, backend="fa3")(*qkv())
    err = _value_error(ei.value)
    assert isinstance(err, ValueError), repr(ei.value)
    assert name in str(err) and repr(value) in str(err), str(err)
    assert str(err) in str(ei.value), str(ei.value)  # the user sees our text through BackendCompilerFailed


@pytest.mark.parametrize("options,word", [({"fa3.kernel": "bogus"}, "kernel"), ({"fa3.nope": 1}, "nope"),
                                          ({"fa3.sdpa_rewrite": "maybe"}, "sdpa_rewrite"),
                                          ({"fa3.force_rewrite": "true"}, "force_rewrite")])
def test_bad_compile_options_named(options, word):
    with pytest.raises(Exception) as ei:
        torch.compile(causal_attention, backend="fa3", options=options)(*qkv())
    err = _value_error(ei.value)
    assert isinstance(err, ValueError), repr(ei.value)
    assert word in str(err), str(err)
    assert str(err) in str(ei.value), str(ei.value)  # the user sees our text through BackendCompilerFailed


def test_unknown_option_lists_known_ones():
    from fa3_inductor import config_check
    with pytest.raises(ValueError) as ei:
        config_check.split_options({"fa3.nope": 1})
    assert "nope" in str(ei.value) and "kernel" in str(ei.value)


def test_bad_mode():
    with pytest.raises(Exception) as ei:
        torch.compile(causal_attention, backend="fa3", mode="turbo")(*qkv())
    assert "turbo" in str(ei.value) and "mode" in str(ei.value)


def test_options_prefix_split():
    from fa3_inductor import config_check
    ours, theirs = config_check.split_options({"fa3.kernel": "triton", "max_autotune": False,
                                               "fa3.force_rewrite": True, "epilogue_fusion": True})
    assert ours == {"kernel": "triton", "force_rewrite": True}
    assert theirs == {"max_autotune": False, "epilogue_fusion": True}


def test_fa3_options_apply_per_compile_and_inductor_options_pass_through():
    """{"fa3.force_rewrite": True} rewrites in this compile only; {"max_autotune": False} reaches
    Inductor's config patches."""
    seen = {}
    import torch._inductor.compile_fx as cfx
    real = cfx.compile_fx

    def spy(gm, ex, config_patches=None, **kw):
        seen.update(config_patches or {})
        return torch._dynamo.lookup_backend("aot_eager")(gm, ex)
    cfx.compile_fx = spy
    try:
        clear_reports()
        out = torch.compile(causal_attention, backend="fa3",
                            options={"fa3.force_rewrite": True, "max_autotune": False})(*qkv())
    finally:
        cfx.compile_fx = real
    assert seen.get("max_autotune") is False
    assert not any(k.startswith("fa3.") for k in seen)
    assert len(rewritten_sites()) == 1, describe_reports()
    assert fa3_inductor.config.force_rewrite is False
    torch.testing.assert_close(out, causal_attention(*qkv()), atol=1e-5, rtol=1e-5)


def test_real_inductor_options_pass_through():
    out = torch.compile(causal_attention, backend="fa3", options={"max_autotune": False})(*qkv())
    torch.testing.assert_close(out, causal_attention(*qkv()), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# entry point and CPU behaviour
# ---------------------------------------------------------------------------------------------
def test_entry_point_without_import():
    code = ("import sys, torch\n"
            "y = torch.compile(lambda x: x.softmax(-1) @ x, backend='fa3')(torch.randn(4, 4))\n"
            "assert y.shape == (4, 4)\n"
            "print('ok', 'fa3_inductor' in sys.modules)\n")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok True" in r.stdout, r.stdout


def test_backend_registered_name():
    assert "fa3" in torch._dynamo.list_backends(exclude_tags=())


def test_cpu_without_force_rewrite_leaves_graph_unchanged():
    seen = []

    def inner(gm, ex):
        seen.append(gm)
        return gm.forward
    clear_reports()
    from unittest import mock
    with mock.patch("torch._inductor.compile_fx.compile_fx", lambda gm, ex, config_patches=None: inner(gm, ex)):
        out = torch.compile(causal_attention, backend="fa3")(*qkv())
    torch.testing.assert_close(out, causal_attention(*qkv()))
    entries = matched_entries()
    assert len(entries) == 1
    site, done, why = entries[0]
    assert done is False and "CPU" in why and "force_rewrite" in why
    code = seen[0].code
    assert "fa3" not in code and "softmax" in code
    assert not any("fa3" in str(n.target) for n in seen[0].graph.nodes)


def test_force_rewrite_graph_has_op_and_no_softmax():
    seen = []
    from unittest import mock

    def inner(gm, ex, config_patches=None):
        seen.append(gm)
        return gm.forward
    with fa3_inductor.config.patch(force_rewrite=True), \
            mock.patch("torch._inductor.compile_fx.compile_fx", inner):
        torch.compile(causal_attention, backend="fa3")(*qkv())
    targets = [str(n.target) for n in seen[0].graph.nodes]
    assert any("fa3.attention_fwd" in t for t in targets), targets
    assert not any("softmax" in t for t in targets), targets
    assert not any(n.op == "call_function" and "masked_fill" in str(n.target) for n in seen[0].graph.nodes)


def test_reports_list_is_bounded():
    fa3_backend_mod.REPORTS.clear()
    for _ in range(70):
        fa3_backend_mod.REPORTS.append(object())
    assert len(fa3_backend_mod.REPORTS) == 70  # plain list; the backend trims after each graph
    torch._dynamo.reset()
    from unittest import mock
    with mock.patch("torch._inductor.compile_fx.compile_fx", lambda gm, ex, config_patches=None: gm.forward):
        torch.compile(causal_attention, backend="fa3")(*qkv())
    assert len(fa3_backend_mod.REPORTS) <= 64
    fa3_backend_mod.REPORTS.clear()


@pytest.mark.parametrize("grad,threshold,left", [(True, 1e15, True), (True, 0, False), (False, 1e15, False),
                                                 (True, 1e3, False)])
def test_small_training_attention_left_to_inductor(grad, threshold, left):
    """The measured size policy (config.min_train_attention_flops) for sites that need gradients."""
    q, k, v = (t.to(torch.bfloat16) for t in qkv())   # the kernels' dtypes (fp32 is left for its own reason)
    q.requires_grad_(grad)
    clear_reports()
    explain(causal_attention, q, k, v)
    site = fa3_backend_mod.REPORTS[-1].matched[0][0]
    with fa3_inductor.config.patch(min_train_attention_flops=threshold):
        why = fa3_backend_mod._site_why_not(site, site.spec)
    flops = fa3_backend_mod.attention_flops(site, site.spec)
    b, h, s, d = q.shape
    assert flops == 3.5 * 2 * b * h * s * s * 2 * d * 0.5   # causal: half of 4*B*H*S*S*D, x3.5 with backward
    if left:
        assert "min_train_attention_flops" in why and "left to Inductor" in why, why
    else:
        assert why is None, why


@pytest.mark.parametrize("mode,expect", [("max-autotune", True), ("max-autotune-no-cudagraphs", True),
                                         ("default", False), (None, False)])
def test_max_autotune_mode_reaches_the_kernels(mode, expect, monkeypatch):
    """The kernels pick their configuration when the compiled graph runs, so the mode must outlive
    the compile: each rewritten site's spec carries it (AttentionSpec.autotune)."""
    import torch._inductor.compile_fx as cfx
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, config_patches=None, **kw:
                        torch._dynamo.lookup_backend("aot_eager")(gm, ex))
    torch._dynamo.reset()
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):  # (torch.compile takes mode or options, not both)
        torch.compile(causal_attention, backend="fa3", mode=mode)(*qkv())
    specs = [site.spec for site, done, _ in fa3_inductor.backend.REPORTS[-1].matched if done]
    assert len(specs) == 1 and specs[0].autotune is expect
    assert ("autotune" in specs[0].describe()) is expect


@pytest.mark.parametrize("options,kernel", [({}, "auto"), ({"fa3.kernel": "triton"}, "triton"),
                                            ({"fa3.kernel": "reference"}, "reference")])
def test_kernel_option_goes_with_the_site(options, kernel):
    """options={"fa3.kernel": ...} applies to this compile's sites when they run (the op reads
    the spec's kernel before the global config.kernel)."""
    torch._dynamo.reset()
    clear_reports()
    torch.compile(causal_attention, backend="fa3", options={"fa3.force_rewrite": True, **options})(*qkv())
    specs = [site.spec for site, done, _ in fa3_inductor.backend.REPORTS[-1].matched if done]
    assert [sp.kernel for sp in specs] == [kernel]
    assert fa3_inductor.config.kernel == "auto"


@pytest.mark.parametrize("value", [False, True])
def test_deterministic_backward_option_goes_with_the_site(value):
    torch._dynamo.reset()
    clear_reports()
    torch.compile(causal_attention, backend="fa3",
                  options={"fa3.force_rewrite": True, "fa3.deterministic_backward": value})(*qkv())
    specs = [site.spec for site, done, _ in fa3_inductor.backend.REPORTS[-1].matched if done]
    assert [sp.deterministic_backward for sp in specs] == [value]
    assert ("dq=atomic" in specs[0].describe()) is (not value)
