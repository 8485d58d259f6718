"""Run by test_fp8_attention.py with TRITON_INTERPRET=1: the Triton FP8 attention kernel
(with the Triton quantisation) vs the torch emulation of the same arithmetic, and both vs
the fp64 reference.  The interpreter runs fp8 dots (it upcasts the loaded e4m3 values);
its own fp32 -> e4m3 cast is buggy, so the kernel rounds onto the e4m3 grid first there."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from fa3_inductor import reference  # noqa: E402
from fa3_inductor.fp8 import attention  # noqa: E402
from fa3_inductor.spec import AttentionSpec  # noqa: E402

CASES = [  # causal, align, sq, sk, hq, hk
    (False, "top_left", 70, 90, 4, 2),
    (True, "top_left", 70, 70, 2, 2),
    (True, "bottom_right", 50, 90, 4, 1),
    (True, "bottom_right", 90, 40, 2, 2),   # rows with no key: out 0, lse -inf
]
TILES = (32, 16, 4, 1)


def main():
    torch.manual_seed(0)
    for causal, align, sq, sk, hq, hk in CASES:
        spec = AttentionSpec(window_right=0 if causal else None, align=align, out_dtype="bfloat16")
        q = torch.randn(2, hq, sq, 64).bfloat16()
        k = torch.randn(2, hk, sk, 64).bfloat16()
        v = torch.randn(2, hk, sk, 64).bfloat16()
        o, lse = attention.forward(q, k, v, None, None, None, None, 0.125, spec, tiles=TILES)
        oe, lsee = attention.emulated_forward(q, k, v, None, None, None, None, 0.125, spec, tiles=TILES)
        ref, lref = reference.forward(q.double(), k.double(), v.double(), None, None, None, None, 0.125,
                                      spec.replace(out_dtype="float64"))
        dead = torch.isneginf(lref)
        assert torch.equal(torch.isneginf(lse), dead) and torch.equal(torch.isneginf(lsee), dead)
        assert (o[dead] == 0).all()
        live = ~dead
        # Kernel vs emulation: same roundings; differences are fp32 summation order and an
        # occasional bf16 output ulp.
        assert (o.float() - oe.float()).abs().max() <= 2 ** -5, (o.float() - oe.float()).abs().max()
        assert (lse - lsee)[live].abs().max() <= 1e-5
        # vs fp64: FP8 error level (docs/fp8.md)
        rmse = (o.double() - ref).pow(2).mean().sqrt().item()
        assert rmse < 3e-2, rmse
        assert (lse.double() - lref)[live].abs().max() < 0.15
        print(causal, align, sq, sk, hq, hk, "rmse", rmse)
    print("OK")


if __name__ == "__main__":
    sys.exit(main())
