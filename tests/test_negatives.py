"""Near-misses that must NOT be rewritten: the matcher leaves them alone with an informative reason
(in REPORTS and in explain().unmatched), and the compiled output still equals eager."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fa3_inductor
from helpers import compile_fa3, explain, matched_entries, rewritten_sites, unmatched_entries, clear_reports, \
    describe_reports

B, H, S, D = 2, 2, 8, 8


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv():
    return rnd(B, H, S, D, seed=1), rnd(B, H, S, D, seed=2), rnd(B, H, S, D, seed=3)


def softmax_dim_m2(q, k, v):
    return (q @ k.transpose(-1, -2) * 0.3).softmax(dim=-2) @ v


def softmax_dim_1(q, k, v):
    return F.softmax(q @ k.transpose(-1, -2) * 0.3, dim=1) @ v


def returns_weights(q, k, v):
    p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    return p @ v, p


def weights_reused(q, k, v):
    p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    return p @ v + p.sum(-1, keepdim=True)


def mask_not_broadcast(q, k, v, m):
    # a 5-D "mask" [2, B, H, S, S]: torch broadcasts it, but the result is no [B, H, Sq, Sk] score tensor
    return ((q @ k.transpose(-1, -2) * 0.3) + m).softmax(-1) @ v


def scores_times_tensor(q, k, v, t):
    return ((q @ k.transpose(-1, -2)) * t).softmax(-1) @ v


def classifier_softmax(q, k, v):
    s = q @ k.transpose(-1, -2)
    return s.softmax(-1).sum(-1)


def sigmoid_then_softmax(q, k, v):
    return torch.sigmoid(q @ k.transpose(-1, -2)).softmax(-1) @ v


def squared_scores(q, k, v):
    return ((q @ k.transpose(-1, -2) * 0.3) ** 2).softmax(-1) @ v


def fill_zero(q, k, v):
    T = q.shape[-2]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return (q @ k.transpose(-1, -2) * 0.3).masked_fill(mask, 0.0).softmax(-1) @ v


def fill_small_negative(q, k, v):
    T = q.shape[-2]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return (q @ k.transpose(-1, -2) * 0.3).masked_fill(mask, -5.0).softmax(-1) @ v


def probs_through_exp(q, k, v):
    return torch.exp((q @ k.transpose(-1, -2) * 0.3).softmax(-1)) @ v


def log_softmax_attention(q, k, v):
    return F.log_softmax(q @ k.transpose(-1, -2) * 0.3, dim=-1) @ v


def scores_used_twice(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.3
    return s.softmax(-1) @ v + s.mean()


def pv_on_the_right(q, k, v):
    p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    return v.transpose(-1, -2) @ p  # [.., D, S]: not P V


CASES = {
    # name: (fn, extra args, key words (any) expected in the reason)
    "softmax_dim_-2": (softmax_dim_m2, (), ("dim",)),
    "softmax_dim_1": (softmax_dim_1, (), ("dim",)),
    "returned_weights": (returns_weights, (), ("another use", "use")),
    "weights_reused": (weights_reused, (), ("another use", "use")),
    "mask_not_broadcast": (mask_not_broadcast, (rnd(2, B, H, S, S, seed=5),), ("broadcast", "5-D")),
    "scores_times_tensor": (scores_times_tensor, (rnd(B, H, S, S, seed=6),), ("tensor", "scalar")),
    "classifier_softmax": (classifier_softmax, (), ("P V", "product", "sum")),
    "sigmoid_then_softmax": (sigmoid_then_softmax, (), ("sigmoid",)),
    "squared_scores": (squared_scores, (), ("pow",)),
    "masked_fill_zero": (fill_zero, (), ("0.0", "not a mask")),
    "masked_fill_small_negative": (fill_small_negative, (), ("-5", "not a mask")),
    "probs_through_exp": (probs_through_exp, (), ("exp",)),
    "log_softmax": (log_softmax_attention, (), None),
    "pv_on_the_right": (pv_on_the_right, (), ("left operand", "operand", "P V")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_not_rewritten_and_output_equals_eager(name):
    fn, extra, words = CASES[name]
    args = qkv() + tuple(extra)
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(fn)(*args)
    assert rewritten_sites() == [], f"{name} must not be rewritten:\n{describe_reports()}"
    assert matched_entries() == [], describe_reports()
    ref = fn(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if words is None:  # no softmax at all: nothing to report
        return
    um = unmatched_entries()
    assert len(um) == 1, describe_reports()
    reason = um[0].reason
    assert reason and any(w.lower() in reason.lower() for w in words), f"uninformative reason: {reason!r}"


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2] is not None])
def test_explain_reports_reason(name):
    fn, extra, words = CASES[name]
    rep = explain(fn, *(qkv() + tuple(extra)))
    assert rep.matched == [], str(rep)
    assert len(rep.unmatched) == 1, str(rep)
    u = rep.unmatched[0]
    assert any(w.lower() in u.reason.lower() for w in words), f"uninformative reason: {u.reason!r}"
    assert u.source, "the unmatched softmax has no source line"
    assert u.reason in str(rep)


class GatedAttention(nn.Module):
    """Attention whose probabilities are scaled by a learned per-head gate: not expressible."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.rand(1, H, 1, 1))

    def forward(self, q, k, v):
        p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
        return (p * self.gate) @ v


def test_gated_probabilities_not_matched():
    m = GatedAttention()
    args = qkv()
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(m)(*args)
    assert rewritten_sites() == []
    torch.testing.assert_close(out, m(*args), atol=1e-5, rtol=1e-5)
    assert "mul" in unmatched_entries()[0].reason


def test_mixed_graph_only_the_real_site_is_rewritten():
    """A classifier softmax next to a real attention: one rewrite, one left alone."""
    def fn(q, k, v):
        a = (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v
        return a.mean(-1).softmax(-1)
    args = qkv()
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(fn)(*args)
    assert len(rewritten_sites()) == 1 and len(unmatched_entries()) == 1, describe_reports()
    torch.testing.assert_close(out, fn(*args), atol=1e-5, rtol=1e-5)


def test_softmax_of_1d_not_matched():
    def fn(x, w):
        return x.softmax(-1) @ w
    x, w = rnd(8, seed=1), rnd(8, 3, seed=2)
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(fn)(x, w)
    assert rewritten_sites() == []
    torch.testing.assert_close(out, fn(x, w))
    assert math.isfinite(out.sum().item())


def test_scores_with_a_second_use_stay_correct():
    """The scores also feed another computation: rewriting is allowed (the scores stay alive for
    the other use) but the result must equal eager."""
    args = qkv()
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(scores_used_twice)(*args)
    torch.testing.assert_close(out, scores_used_twice(*args), atol=1e-5, rtol=1e-5)
