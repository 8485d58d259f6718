"""Launch plans on the CPU (no launch): fast_launch.Launch's argument tail and descriptors, the
routes triton_impl remembers per call signature (and re-decides when a switch changes), and the
Gluon plans reused for new tensors of the same signature.  The direct launches themselves are
checked on the H100 (tests/gpu/test_fast_launch_gpu.py)."""
import pytest
import torch

from fa3_inductor import config as fa3_config
from fa3_inductor.ops import fast_launch, gluon_bwd, gluon_fwd, triton_impl
from fa3_inductor.spec import AttentionSpec

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _kernel(a, b, C: tl.constexpr, D: tl.constexpr = 4, E=7):
    pass


def test_tail_is_every_parameter_after_the_positional_ones():
    launch = fast_launch.Launch(_kernel, (3,), C=2, num_warps=4)
    assert launch.grid3 == (3, 1, 1)
    assert launch._tail(2) == (2, 4, 7)        # C from the keywords, D and E defaults
    assert launch._tail(3) == (4, 7)
    assert launch._tail(5) == ()
    with pytest.raises(TypeError, match="parameter C not given"):
        fast_launch.Launch(_kernel, (1,))._tail(2)


def test_descriptors_are_the_jits_until_the_kernel_is_compiled():
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    q = torch.zeros(1, 2, 64, 128, dtype=torch.float16)
    layout = gluon_fwd.layouts(128, "fp16")[0]
    launch = fast_launch.Launch(_kernel, (1,))
    (d,) = launch.descriptors([q], [([1, 2, 64, 128], [16384, 8192, 128, 1], [1, 1, 64, 128], layout)])
    assert isinstance(d, TensorDescriptor) and d.block_shape == [1, 1, 64, 128] and d.base is q
    arg = fast_launch.TmaArg(q, [1, 2, 64, 128], [16384, 8192, 128, 1])
    assert (arg.base, arg.shape, arg.strides, arg.padding) == (q, [1, 2, 64, 128], [16384, 8192, 128, 1], "zero")


def _qkv(B=1, Hq=4, Hk=2, Sq=40, Sk=70, D=128):
    return (torch.randn(B, Hq, Sq, D, dtype=torch.float16), torch.randn(B, Hk, Sk, D, dtype=torch.float16),
            torch.randn(B, Hk, Sk, D, dtype=torch.float16))


class _Stop(Exception):
    pass


def _stop(*args):
    raise _Stop


def test_forward_route_is_decided_once_per_signature(monkeypatch):
    """The Gluon checks run once per call signature; a new shape, a new spec or a switch read at
    run time (config.gluon_forward) decides again."""
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)
    checks, seen = [], []
    real = triton_impl._gluon_fwd_check
    monkeypatch.setattr(triton_impl, "_gluon_fwd_check", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    monkeypatch.setattr(gluon_fwd, "forward", lambda q, k, v, scale, spec, persistent=None, strides=None:
                        seen.append(strides) or (torch.zeros_like(q), torch.zeros(q.shape[:3])))
    spec = AttentionSpec(window_right=0, out_dtype="float16")
    for _ in range(3):
        triton_impl.forward(*_qkv(), None, None, None, None, 0.1, spec)
    assert len(checks) == 1 and len(seen) == 3 and seen[0] == seen[2]
    triton_impl.forward(*_qkv(Sq=41), None, None, None, None, 0.1, spec)
    triton_impl.forward(*_qkv(), None, None, None, None, 0.1, AttentionSpec(out_dtype="float16"))
    assert len(checks) == 3
    monkeypatch.setattr(triton_impl, "_fwd_config", _stop)     # the tl route, stopped before its launch
    with fa3_config.patch(gluon_forward=False), pytest.raises(_Stop):
        triton_impl.forward(*_qkv(), None, None, None, None, 0.1, spec)
    assert len(checks) == 4 and len(seen) == 5


def test_backward_route_keys_on_the_determinism_setting(monkeypatch):
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)
    monkeypatch.setattr(triton_impl, "DETERMINISTIC_GLUON_MIN_SK",
                        dict.fromkeys(triton_impl.DETERMINISTIC_GLUON_MIN_SK, 0))
    checks, modes = [], []
    real = triton_impl._gluon_bwd_check
    monkeypatch.setattr(triton_impl, "_gluon_bwd_check", lambda *a, **kw: checks.append(1) or real(*a, **kw))
    monkeypatch.setattr(gluon_bwd, "backward", lambda dout, q, k, v, out, lse, scale, spec, det, *, strides=None:
                        modes.append(det) or (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)))
    q, k, v = _qkv()
    out, dout, lse = torch.zeros_like(q), torch.randn_like(q), torch.zeros(q.shape[:3])
    spec = AttentionSpec()
    for det in (True, True, False, False):
        with fa3_config.patch(deterministic_backward=det):
            triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, 0.1, spec, False)
    assert modes == [True, True, False, False] and len(checks) == 2


def test_gluon_plans_are_reused_for_new_tensors(monkeypatch):
    """gluon_fwd.forward / gluon_bwd.backward build one plan per signature and launch it with
    each call's own tensors (the launch itself recorded, not run)."""
    launched = []
    monkeypatch.setattr(fast_launch.Launch, "__call__", lambda self, *args: launched.append((self, args)))
    spec = AttentionSpec(window_right=0)
    calls = [_qkv() for _ in range(2)]
    outs = [gluon_fwd.forward(q, k, v, 0.1, spec) for q, k, v in calls]
    assert len(gluon_fwd._PLANS) == 1
    (l0, a0), (l1, a1) = launched
    assert l0 is l1 and a0[0].base is calls[0][0] and a1[0].base is calls[1][0]
    assert a1[3].base is outs[1][0] and a1[4] is outs[1][1]      # the out descriptor, lse
    assert a0[5:11] == a1[5:11] and a0[12:] == a1[12:]            # the scalars and constants
    launched.clear()
    for q, k, v in calls:
        gluon_bwd.backward(torch.randn_like(q), q, k, v, torch.zeros_like(q), torch.zeros(q.shape[:3]), 0.1, spec,
                           True)
    assert len(gluon_bwd._PLANS) == 1 and len(launched) == 6
    pre, main, fin = (launched[i][0] for i in range(3))
    assert [l for l, _ in launched[3:]] == [pre, main, fin]
    assert launched[4][1][0].base is calls[1][0]                 # the second call's q


@pytest.mark.parametrize("shape", [(2, 8, 1000, 128), (1, 8, 17, 256), (2, 1, 5, 128), (1, 1, 1, 128)])
def test_contiguous_out_strides_are_tma_strides(shape):
    """FwdPlan works out the fresh out tensor's TMA strides from its shape (size-1 dims included)
    as tma_strides would from the tensor; prepare() refuses an out TMA cannot write."""
    want = gluon_fwd.tma_strides(torch.empty(shape, dtype=torch.float16))
    assert gluon_fwd._contiguous_tma_strides(shape) == list(want)
    q, k, v = _qkv(Sq=40, Sk=40)
    bad = torch.empty(1, 4, 40, 130, dtype=torch.float16)[..., :128]     # row stride 260 bytes
    with pytest.raises(ValueError, match="out strides .* not TMA-writable"):
        gluon_fwd.prepare(q, k, v, 0.1, False, False, out=bad)


def test_signature_cache_builds_once_and_stays_bounded():
    from fa3_inductor.ops.signature_cache import SignatureCache, tensor_key
    cache, built = SignatureCache(limit=2), []
    for key in ("a", "a", "b"):
        assert cache.get_or_build(key, lambda: built.append(key) or key.upper()) == key.upper()
    assert built == ["a", "b"] and len(cache) == 2
    cache.get_or_build("c", lambda: "C")          # full: emptied, then "c"
    assert dict(cache) == {"c": "C"}
    t = torch.zeros(2, 3)
    assert tensor_key(t) == (t.shape, (3, 1), torch.float32, t.data_ptr() % 16)
    assert tensor_key(t.t()) != tensor_key(t.t().contiguous())
