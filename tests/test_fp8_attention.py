"""FP8 attention forward on the CPU: the torch emulation against the fp64 reference, and
the Triton kernel under TRITON_INTERPRET=1 (subprocess) against the emulation."""
import math
import os
import subprocess
import sys

import pytest
import torch

from fa3_inductor import reference
from fa3_inductor.fp8 import attention, emulate
from fa3_inductor.spec import AttentionSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outliers(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    pick = torch.rand(shape, generator=g, dtype=torch.float64) < 1e-3
    return torch.where(pick, torch.randn(shape, generator=g, dtype=torch.float64) * 10, x)


def rmse(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "top_left"), (True, "bottom_right")])
def test_emulated_fp8_close_to_fp64(causal, align):
    spec = AttentionSpec(window_right=0 if causal else None, align=align, out_dtype="float64")
    q, k, v = (outliers((1, 4, 300, 128), s) for s in range(3))
    k, v = k[:, :2, :260], v[:, :2, :260]  # GQA 4:2, sq != sk
    ref, lref = reference.forward(q, k, v, None, None, None, None, 128 ** -0.5, spec)
    out, lse = emulate.attention(q.float(), k.float(), v.float(), 128 ** -0.5, spec, block_m=64, block_n=64)
    live = torch.isfinite(lref)
    assert torch.equal(torch.isneginf(lse), ~live)
    assert rmse(out, ref) < 2.5e-2
    # Outlier q . outlier k scores carry an absolute error of ~0.1-0.2 after FP8 rounding.
    err = (lse.double() - lref)[live].abs()
    assert err.max() < 0.3 and err.mean() < 0.02, (err.max(), err.mean())


@pytest.mark.parametrize("causal,align", [(False, "top_left"), (True, "bottom_right")])
def test_emulation_of_the_cuda_key_order(causal, align):
    """descending=True (the CUDA template's key order) is the same attention: close to fp64 and
    to the ascending walk (only which running max P is quantised against differs), while the
    quantised P does differ, so the GPU tests must emulate the order the kernel uses."""
    spec = AttentionSpec(window_right=0 if causal else None, align=align, out_dtype="float64")
    q, k, v = (outliers((1, 2, 200, 64), 20 + s) for s in range(3))
    k, v = k[:, :, :333], v[:, :, :333]
    ref, _ = reference.forward(q, k, v, None, None, None, None, 0.125, spec)
    up, lup = emulate.attention(q.float(), k.float(), v.float(), 0.125, spec, block_m=128, block_n=128)
    down, ldown = emulate.attention(q.float(), k.float(), v.float(), 0.125, spec, block_m=128, block_n=128,
                                    descending=True)
    assert rmse(down, ref) < 2.5e-2 and rmse(down, up) < 1e-2
    assert not torch.equal(down, up)
    live = torch.isfinite(lup)
    assert torch.equal(live, torch.isfinite(ldown)) and (lup - ldown)[live].abs().max() < 1e-4


@pytest.mark.parametrize("permute", [False, True])
def test_emulation_from_quantized_operands(permute):
    """attention_quantized on quantize_qkv's output (V^T plain or in the CUDA key order) is the
    emulation itself: the GPU tests use it to compare a kernel with the arithmetic on the very
    operands it was given."""
    from fa3_inductor.fp8 import quantize
    spec = AttentionSpec(window_right=0, align="bottom_right", out_dtype="float32")
    q, k, v = (outliers((1, 4, n, 64), 30 + s).float() for s, n in ((0, 100), (1, 77), (2, 77)))
    k, v = k[:, :2], v[:, :2]
    signs = attention.signs_for(spec, 64, q.device)
    qq = quantize.quantize_qkv(q, k, v, 64, 32, signs, impl="ref", permute=permute)
    got, lse = emulate.attention_quantized(qq, 0.125, spec, 77, permuted=permute, descending=True)
    want, lwant = emulate.attention(q, k, v, 0.125, spec, block_m=64, block_n=32, signs=signs, descending=True)
    assert torch.equal(got, want) and torch.equal(lse, lwant)


def test_cpu_emulation_follows_the_triton_kernel():
    # On the CPU the CUDA FP8 kernel is unavailable: the emulation uses the Triton tiles, ascending.
    spec = AttentionSpec(out_dtype="float32")
    q = torch.randn(1, 1, 40, 128)
    assert attention.kernel_for(q, q, q, None, spec) == "triton"
    out, _ = attention.emulated_forward(q, q, q, None, None, None, None, 0.1, spec)
    bm, bn, _, _ = attention.tiles_for(128)
    want, _ = emulate.attention(q, q, q, 0.1, spec, block_m=bm, block_n=bn,
                                signs=attention.signs_for(spec, 128, q.device))
    assert torch.equal(out, want.float())


def test_error_ordering_on_outlier_data():
    # The paper's claim in miniature: block + incoherent beats per-tensor scaling.
    spec = AttentionSpec(out_dtype="float64")
    q, k, v = (outliers((1, 2, 512, 128), 10 + s) for s in range(3))
    ref, _ = reference.forward(q, k, v, None, None, None, None, 128 ** -0.5, spec)
    errs = {}
    for name, gran, inc in [("tensor", "tensor", False), ("both", "block", True)]:
        out, _ = emulate.attention(q.float(), k.float(), v.float(), 128 ** -0.5, spec, granularity=gran,
                                   incoherent=inc)
        errs[name] = rmse(out, ref)
    assert errs["both"] < errs["tensor"] / 1.3, errs


def test_emulated_forward_contract_shapes():
    spec = AttentionSpec(window_right=0, out_dtype="bfloat16")
    q = torch.randn(2, 4, 33, 64).bfloat16()
    k = torch.randn(2, 1, 33, 64).bfloat16()
    out, lse = attention.emulated_forward(q, k, k, None, None, None, None, 0.125, spec)
    assert out.shape == (2, 4, 33, 64) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32


def test_supports_reasons_on_cpu():
    q = torch.randn(1, 2, 8, 128)
    assert "CUDA" in attention.supports(q, q, q, None, AttentionSpec())


def test_quantize_p_range():
    p = torch.tensor([1.0, 0.5, 1e-3, 1e-5, 1e-7, 0.0])
    pq = emulate.quantize_p(p)
    assert pq[0] == 1.0 and pq[-1] == 0.0 and pq[4] == 0.0  # below 2^-9 / 448: flushed
    assert ((pq[:4] - p[:4]).abs() <= p[:4] * 2 ** -4 + 2 ** -10 / 448).all()
    _ = math


def test_triton_fp8_attention_interpreted():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_interp_attention.py")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
