"""FP8 quantisation and Hadamard rotation on the CPU (torch reference; the Triton
quantisation kernel under TRITON_INTERPRET=1 in a subprocess, see _interp_quant.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from fa3_inductor.fp8 import hadamard, quantize, quantize_launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outliers(shape, seed=0, frac=1e-3, std=10.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    pick = torch.rand(shape, generator=g) < frac
    return torch.where(pick, torch.randn(shape, generator=g) * std, x)


@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_rotation_is_orthogonal_and_matches_fwht(d):
    s = hadamard.random_signs(d, 7)
    m = hadamard.rotation_matrix(s)
    assert torch.allclose(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 3, d, dtype=torch.float64)
    assert torch.allclose(hadamard.rotate(x, s), x @ m, atol=1e-12)
    h = hadamard.hadamard_matrix(d, normalized=False)
    i = torch.arange(d)
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(d)] for a in range(d)])
    assert torch.equal(h, (1 - 2 * parity).double())  # the +-1 matrix the Triton kernel builds
    del i


def test_qk_invariance():
    q, k = torch.randn(2, 4, 33, 128, dtype=torch.float64), torch.randn(2, 4, 40, 128, dtype=torch.float64)
    s = hadamard.random_signs(128, hadamard.site_seed("site-a"))
    ref = q @ k.transpose(-1, -2)
    rot = hadamard.rotate(q, s) @ hadamard.rotate(k, s).transpose(-1, -2)
    assert torch.allclose(rot, ref, atol=1e-10)


def test_signs_deterministic_and_site_dependent():
    a = hadamard.random_signs(128, hadamard.site_seed("x"))
    assert torch.equal(a, hadamard.random_signs(128, hadamard.site_seed("x")))
    assert not torch.equal(a, hadamard.random_signs(128, hadamard.site_seed("y")))
    assert set(a.tolist()) <= {-1.0, 1.0}


def test_non_pow2_head_dim_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard.rotate(torch.randn(2, 96), torch.ones(96))


def test_scales_are_block_amax_over_448_and_zero_guarded():
    x = torch.randn(2, 3, 100, 64)
    x[0, 1, 32:64] = 0.0                      # an all-zero block of 32 rows
    x8, sc = quantize.quantize_ref(x, 32)
    assert sc.shape == (2, 3, 4) and x8.dtype == torch.float8_e4m3fn
    amax = torch.nn.functional.pad(x, (0, 0, 0, 28)).view(2, 3, 4, 32 * 64).abs().amax(-1)
    exp = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    assert torch.equal(sc, exp)
    assert sc[0, 1, 1] == 1.0 and (x8[0, 1, 32:64].float() == 0).all()
    assert torch.isfinite(x8.float()).all() and x8.float().abs().max() <= 448


def test_round_trip_error_bound():
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for normal values, absolute error
    # <= 2^-10 * scale in the subnormal range (below 2^-6 * scale).
    x = outliers((2, 2, 256, 128))
    x8, sc = quantize.quantize_ref(x, 64)
    back = quantize.dequantize(x8, sc, 64)
    srow = sc.repeat_interleave(64, dim=2).unsqueeze(-1)
    bound = torch.maximum(x.abs() * 2.0 ** -4, srow * 2.0 ** -10)
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()


def test_block_beats_per_tensor_on_outliers():
    # Rows of small values get their own (small) scale with block scaling; with one scale
    # per tensor, set by an outlier, they fall into e4m3's subnormal range and lose bits.
    # Measured as the error relative to each row's size, averaged over rows.
    x = outliers((2, 4, 1024, 128), seed=3) * torch.logspace(-4, 0, 1024).view(1, 1, -1, 1)

    def err(x8, back):
        return ((back - x).pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt()).mean().item()

    t8, ts = quantize.quantize_per_tensor(x)
    b8, bs = quantize.quantize_ref(x, 128)
    e_tensor = err(t8, quantize.dequantize(t8, ts, 128))
    e_block = err(b8, quantize.dequantize(b8, bs, 128))
    assert e_block < 0.7 * e_tensor, (e_block, e_tensor)


def test_rotation_lowers_amax_of_outlier_rows():
    x = outliers((1, 1, 512, 128), seed=5, frac=2e-3, std=30.0)
    s = hadamard.random_signs(128, 1)
    _, sc = quantize.quantize_ref(x, 64)
    _, sc_rot = quantize.quantize_ref(x, 64, s)
    assert sc_rot.max() < 0.5 * sc.max()


def test_key_permutation_for_the_cuda_template():
    """V^T of the CUDA template: keys reordered within each group of 32 (a bijection that moves
    pairs (2q, 2q+1) of each 8 next to each other, the 8-bit WGMMA operand order), zero pad."""
    pi = quantize.key_permutation()
    assert sorted(pi.tolist()) == list(range(32))
    assert pi[:8].tolist() == [0, 1, 8, 9, 2, 3, 10, 11]
    assert torch.equal(pi[16:], pi[:16] + 16)
    vt = torch.arange(2 * 70, dtype=torch.float32).view(2, 70) + 1
    out = quantize.permute_keys(vt)
    assert out.shape == (2, 96)
    for g in range(3):
        for c in range(32):
            j = 32 * g + int(pi[c])
            want = vt[:, j] if j < 70 else torch.zeros(2)
            assert torch.equal(out[:, 32 * g + c], want), (g, c)
    # Dequantising the permuted V^T and undoing the permutation gives V back (ref path).
    v = torch.randn(1, 2, 45, 64)
    qq = quantize.quantize_qkv(v, v, v, 64, 64, None, impl="ref", permute=True)
    inv = torch.argsort(pi)
    back = qq.vt8.float().view(1, 2, 64, 2, 32)[..., inv].reshape(1, 2, 64, 64)[..., :45]
    v8, _ = quantize.quantize_ref(v, 64, None)
    assert torch.equal(back, v8.float().transpose(2, 3))
    with pytest.raises(ValueError, match="permute needs transpose=True"):
        quantize_launch.quantize_triton(v, 64, None, permute=True)


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256, 512])
def test_rotation_chunks_are_the_kronecker_split(d):
    """H_d = H_{d/w} (x) H_w in Sylvester's ordering: x @ diag(s) H_d / sqrt(d) is, per output chunk
    c, sum_c' H_{d/w}[c', c] (x_c' @ chunk_c'), the persistent kernel's GEMMs (d = 256: u0 + u1 and
    u0 - u1 of two 128-wide GEMMs); exact in fp64 for every width the kernel could use."""
    s = hadamard.random_signs(d, 3)
    x = torch.randn(7, d, dtype=torch.float64)
    dense = x @ hadamard.rotation_matrix(s)
    for w in sorted({min(d, 128), 16, d}):
        m = hadamard.rotation_chunks(s, w, torch.float64)
        u = [x[:, c * w:(c + 1) * w] @ m[c * w:(c + 1) * w] for c in range(d // w)]
        outer = hadamard.hadamard_matrix(d // w, normalized=False)
        y = torch.cat([sum(outer[c2, c] * u[c2] for c2 in range(d // w)) for c in range(d // w)], 1)
        assert torch.allclose(y / math.sqrt(d), dense, rtol=0, atol=1e-12), (d, w)
    if d == 256:
        m = hadamard.rotation_chunks(s, 128, torch.float64, quantize_launch.rotation_fold(d))
        u0, u1 = x[:, :128] @ m[:128], x[:, 128:] @ m[128:]
        assert torch.allclose(torch.cat([u0 + u1, u0 - u1], 1), dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotation_chunks_exact_in_16_bits(d, dtype):
    """The kernel's GEMM operand holds +-fold exactly (fold = 1/sqrt(d) where that is a power of
    two), so the tensor cores' products with 16-bit inputs are exact."""
    fold = quantize_launch.rotation_fold(d)
    assert fold == {64: 0.125, 128: 1.0, 256: 0.0625}[d]
    m = hadamard.rotation_chunks(hadamard.random_signs(d, 9), min(d, 128), dtype, fold)
    assert m.dtype == dtype and m.shape == (d, min(d, 128))
    assert set(m.double().abs().unique().tolist()) == {fold}


def test_fma_division_is_correctly_rounded():
    """The persistent kernel's y / s: r = RN(1/s) once per tile, then q0 = RN(y r),
    q = RN(q0 + RN(y - s q0) r) (two FMAs) is RN(y / s), the reference's division, where y r
    alone is not.  Emulated in fp64, where every step but the final rounding is exact."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 20
    amax = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-30, 30, generator=g)).float()
    y = (amax.double() * torch.empty(n, dtype=torch.float64).uniform_(-1, 1, generator=g)).float()
    y[: n // 2] = y[: n // 2].bfloat16().float()   # 16-bit inputs (V, unrotated Q/K)
    y[:1000] = amax[:1000]                        # the tile's largest value itself
    s = (amax.double() * float(torch.tensor(1 / 448.0))).float()
    r = (1.0 / s.double()).float()
    q0 = (y.double() * r.double()).float()
    e = (y.double() - s.double() * q0.double()).float()
    q = (q0.double() + e.double() * r.double()).float()
    want = (y.double() / s.double()).float()
    assert torch.equal(q, want)
    assert not torch.equal(q0, want)


def test_persistent_kernel_tiles_and_stages():
    """A 96/160/192-row tile is two power-of-two parts; 224 pads its second part to 128 rows; the
    pipeline is 3 deep where 3 tiles and the rotation fit in shared memory, else 2 (d256)."""
    parts = {b: (quantize_launch.slot_constexprs(b, True, False, False)["BA"], quantize_launch.slot_constexprs(b, True, False, False)["BB"])
             for b in (32, 64, 96, 128, 160, 192, 224, 256)}
    assert parts == {32: (32, 0), 64: (64, 0), 96: (64, 32), 128: (128, 0), 160: (128, 32), 192: (128, 64),
                     224: (128, 128), 256: (256, 0)}
    assert quantize_launch.persistent_config(128, [(128, True), (192, True), (192, False)])["STAGES"] == 3
    assert quantize_launch.persistent_config(256, [(128, True), (128, True), (128, False)])["STAGES"] == 2
    cfg = quantize_launch.persistent_config(128, [(128, True)])
    assert cfg["K"] == 128 and cfg["POST"] == float(torch.tensor(math.sqrt(128), dtype=torch.float32))


def test_quant_kernel_choice(monkeypatch):
    monkeypatch.delenv(quantize_launch.QUANT_KERNEL_ENV, raising=False)
    assert quantize_launch.quant_kernel() == "persistent"
    monkeypatch.setenv(quantize_launch.QUANT_KERNEL_ENV, "legacy")
    assert quantize_launch.quant_kernel() == "legacy" and quantize_launch.quant_kernel("persistent") == "persistent"
    monkeypatch.setenv(quantize_launch.QUANT_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="FA3_FP8_QUANT"):
        quantize_launch.quant_kernel()


def test_triton_quant_kernel_matches_reference_interpreted():
    """Both fused kernels (rotation, scales, V^T; the persistent one for Q, K, V in one launch at
    hdim 64/128/256 with every tile shape of the FP8 paths) against quantize_ref, bit for bit, in
    Triton's interpreter.  A subprocess, because TRITON_INTERPRET must be set before
    triton is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_interp_quant.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
    _ = math
