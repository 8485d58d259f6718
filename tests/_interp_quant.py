"""Run by test_fp8_quant.py with TRITON_INTERPRET=1: the Triton quantisation kernels vs the
torch reference (bit-exact: same fp32 rotation up to summation order, same e4m3 rounding).
Both kernels: the persistent one (the default; the interpreter runs it on 3 programs, so every
program walks several tiles of each tensor) and the legacy per-tile one."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from fa3_inductor.fp8 import hadamard, quantize, quantize_launch  # noqa: E402

# A scale from a rotation summed in another order: a few fp32 ulps (the amax may come from a sum
# with cancellation).
SCALE_RTOL = 1e-6


def basic(kernel):
    """The original checks (hdim 64, 32-key tiles), per kernel."""
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 100, 64).to(dtype)
        x[1, 2, 32:64] = 0  # an all-zero block: scale 1
        x[0, 0, 5, 7] = 300.0  # an outlier
        for signs in (None, hadamard.random_signs(64, 11)):
            y, sc = quantize_launch.quantize_triton(x, 32, signs, kernel=kernel)
            yr, scr = quantize.quantize_ref(x, 32, signs)
            assert torch.allclose(sc, scr, rtol=1e-6, atol=0), (kernel, dtype, signs is not None)
            diff = (y.float() != yr.float()).float().mean().item()
            # rotation: fp32 summation order may move a value across a rounding boundary
            assert diff <= (1e-3 if signs is not None else 0.0), (kernel, dtype, signs is not None, diff)
        yt, sct = quantize_launch.quantize_triton(x, 32, None, transpose=True, kernel=kernel)
        yr, scr = quantize.quantize_ref(x, 32, None)
        assert yt.shape == (2, 3, 64, 112), yt.shape  # keys padded to a multiple of 16
        assert torch.equal(yt[..., :100].transpose(2, 3).float(), yr.float())
        assert torch.equal(sct, scr)
        if kernel == "persistent":  # it writes the pad too (whole 16-byte rows), as zeros
            assert (yt[..., 100:].float() == 0).all()
        # The CUDA template's V^T: keys permuted within groups of 32, padded with zeros to 128.
        x[:, :, 96:] = 5.0  # a non-zero last partial group: its pad must still read as zeros
        yp, scp = quantize_launch.quantize_triton(x, 32, None, transpose=True, permute=True, kernel=kernel)
        qq = quantize.quantize_qkv(x, x, x, 32, 32, None, impl="ref", permute=True)
        assert yp.shape == (2, 3, 64, 128), yp.shape
        assert torch.equal(yp.float(), qq.vt8.float())  # (-0 and +0 may differ under the interpreter)
        assert torch.equal(scp, qq.v_scale)
        # A tile that is not a power of two (the CUDA template's 96-key tile at hdim 256).
        y96, sc96 = quantize_launch.quantize_triton(x, 96, None, transpose=True, permute=True, kernel=kernel)
        q96 = quantize.quantize_qkv(x, x, x, 96, 96, None, impl="ref", permute=True)
        assert torch.equal(y96.float(), q96.vt8.float()) and torch.equal(sc96, q96.v_scale)


def data(shape, seed, dtype):
    """Rows of very different sizes (per-tile scales differ), an outlier, an all-zero tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[2]).view(1, 1, -1, 1)
    x[0, 0, 7, 3] = 300.0
    x[-1, -1, :64] = 0.0
    return x.to(dtype)


def qkv_launch(d, bm, bn, permute, dtype, rotate, transposed_q=False):
    """One persistent launch for Q, K, V against quantize_qkv(impl="ref"): V^T and every unrotated
    value bit for bit; rotated scales within an ulp, values within the summation-order bound."""
    q = data((1, 4, 300, d), 1, dtype)
    k, v = data((1, 2, 333, d), 2, dtype), data((1, 2, 333, d), 3, dtype)  # GQA, another length
    if transposed_q:  # a [B, S, H, D] projection viewed as [B, H, S, D]: strides of any order
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    signs = hadamard.random_signs(d, 5) if rotate else None
    got = quantize.quantize_qkv(q, k, v, bm, bn, signs, impl="triton", permute=permute)
    ref = quantize.quantize_qkv(q, k, v, bm, bn, signs, impl="ref", permute=permute)
    what = (d, bm, bn, permute, dtype, rotate)
    if permute:  # the pad keys sit among the last group's positions, as zeros in both
        assert got.vt8.shape == ref.vt8.shape == (1, 2, d, 352), what
        assert torch.equal(got.vt8.float(), ref.vt8.float()), what
    else:  # the reference has no pad; the kernel writes it as zeros
        assert got.vt8.shape == (1, 2, d, 336), what
        assert torch.equal(got.vt8.float()[..., :333], ref.vt8.float()), what
        assert (got.vt8.float()[..., 333:] == 0).all(), what
    assert torch.equal(got.v_scale, ref.v_scale), what
    for name in ("q", "k"):
        y, yr = getattr(got, f"{name}8").float(), getattr(ref, f"{name}8").float()
        sc, scr = getattr(got, f"{name}_scale"), getattr(ref, f"{name}_scale")
        if rotate:
            assert torch.allclose(sc, scr, rtol=SCALE_RTOL, atol=0), (what, name, (sc / scr - 1).abs().max())
            assert (y != yr).float().mean().item() <= 1e-3, (what, name)
        else:
            assert torch.equal(sc, scr) and torch.equal(y, yr), (what, name)


def main():
    torch.manual_seed(0)
    for kernel in ("persistent", "legacy"):
        basic(kernel)
    # Every head dim of the FP8 paths, with the CUDA template's tiles (keys permuted; 96/160/192
    # are two power-of-two parts, 224 a part padded to 128 rows) and the Triton kernel's (plain V^T).
    cases = [(64, 128, 128, True), (64, 128, 64, False),
             (128, 128, 192, True), (128, 128, 160, True), (128, 128, 64, False), (128, 128, 224, True),
             (256, 128, 128, True), (256, 128, 96, True), (256, 64, 64, False)]
    for d, bm, bn, permute in cases:
        qkv_launch(d, bm, bn, permute, torch.bfloat16, rotate=True)
    qkv_launch(128, 128, 192, True, torch.float16, rotate=True, transposed_q=True)
    qkv_launch(256, 128, 96, True, torch.float16, rotate=False)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
