"""Run by test_fp8_quant.py with TRITON_INTERPRET=1: the Triton quantisation kernel vs the
torch reference (bit-exact: same fp32 rotation up to summation order, same e4m3 rounding)."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from fa3_inductor.fp8 import hadamard, quantize  # noqa: E402


def main():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 100, 64).to(dtype)
        x[1, 2, 32:64] = 0  # an all-zero block: scale 1
        x[0, 0, 5, 7] = 300.0  # an outlier
        for signs in (None, hadamard.random_signs(64, 11)):
            y, sc = quantize.quantize_triton(x, 32, signs)
            yr, scr = quantize.quantize_ref(x, 32, signs)
            assert torch.allclose(sc, scr, rtol=1e-6, atol=0), (dtype, signs is not None)
            diff = (y.float() != yr.float()).float().mean().item()
            # rotation: fp32 summation order may move a value across a rounding boundary
            assert diff <= (1e-3 if signs is not None else 0.0), (dtype, signs is not None, diff)
        yt, sct = quantize.quantize_triton(x, 32, None, transpose=True)
        yr, scr = quantize.quantize_ref(x, 32, None)
        assert yt.shape == (2, 3, 64, 112), yt.shape  # keys padded to a multiple of 16
        assert torch.equal(yt[..., :100].transpose(2, 3).float(), yr.float())
        assert torch.equal(sct, scr)
        # The CUDA template's V^T: keys permuted within groups of 32, padded with zeros to 128.
        x[:, :, 96:] = 5.0  # a non-zero last partial group: its pad must still read as zeros
        yp, scp = quantize.quantize_triton(x, 32, None, transpose=True, permute=True)
        qq = quantize.quantize_qkv(x, x, x, 32, 32, None, impl="ref", permute=True)
        assert yp.shape == (2, 3, 64, 128), yp.shape
        assert torch.equal(yp.float(), qq.vt8.float())  # (-0 and +0 may differ under the interpreter)
        assert torch.equal(scp, qq.v_scale)
        # A tile that is not a power of two (the CUDA template's 96-key tile at hdim 256).
        y96, sc96 = quantize.quantize_triton(x, 96, None, transpose=True, permute=True)
        q96 = quantize.quantize_qkv(x, x, x, 96, 96, None, impl="ref", permute=True)
        assert torch.equal(y96.float(), q96.vt8.float()) and torch.equal(sc96, q96.v_scale)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
