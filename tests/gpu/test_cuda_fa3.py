"""The CUDA (sm_90a) forward against a float64 reference.

Bound per case: max |out - ref64| <= 2 * max |eager_lowp - ref64| + 1e-3, where eager_lowp is the
usual eager formulation in the input precision (fp16/bf16 matmuls, fp32 softmax).  LSE is compared
to the float64 LSE; rows without any kept key must give out = 0 and lse = -inf.
"""
from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor import reference
from fa3_inductor.spec import AttentionSpec

pytestmark = pytest.mark.gpu


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() != (9, 0):
        return "needs sm_90"
    from fa3_inductor.codegen import cuda_jit
    return cuda_jit.toolchain_problem()


_why = _skip_reason()
if _why:
    pytest.skip(f"CUDA template tests skipped: {_why}", allow_module_level=True)

from fa3_inductor.ops import cuda_impl  # noqa: E402

DEV = "cuda"


def _spec(causal="none", window_left=None, window_right=None, out_dtype="float16", gqa="div", softcap=None):
    if causal != "none":
        window_right = 0
    return AttentionSpec(align="bottom_right" if causal == "bottom_right" else "top_left",
                         window_left=window_left, window_right=window_right, out_dtype=out_dtype,
                         gqa_mapping=gqa, softcap=softcap)


def _eager_lowp(q, k, v, scale, spec):
    Hq, Sq, Sk = q.shape[1], q.shape[2], k.shape[2]
    kx = reference.expand_kv(k, Hq, spec.gqa_mapping)
    vx = reference.expand_kv(v, Hq, spec.gqa_mapping)
    s = torch.matmul(q, kx.transpose(-1, -2)).float() * scale
    if spec.softcap:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    keep = reference.keep_mask(spec, torch.arange(Sq, device=q.device), Sq, Sk, q.device, None, None)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p.to(q.dtype), vx).float()


def _make(B, Hq, Hk, Sq, Sk, D, dtype, layout="bhsd", Dv=None):
    g = torch.Generator(device=DEV).manual_seed(B * 1000003 + Sq * 101 + Sk * 7 + D)

    def t(H, S, d=D):
        if layout == "bshd":  # [B, S, H, D] storage viewed as [B, H, S, D]
            return torch.randn(B, S, H, d, device=DEV, dtype=dtype, generator=g).transpose(1, 2)
        return torch.randn(B, H, S, d, device=DEV, dtype=dtype, generator=g)
    return t(Hq, Sq), t(Hk, Sk), t(Hk, Sk, Dv or D)


def _check(q, k, v, spec, scale=None, **ablation):
    D = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    assert cuda_impl.supports(q, k, v, None, spec) is None
    out, lse = cuda_impl.forward(q, k, v, None, None, None, None, scale, spec, **ablation)
    torch.cuda.synchronize()
    spec64 = spec.replace(out_dtype="float64")
    ref, ref_lse = reference.forward(q.double(), k.double(), v.double(), None, None, None, None, scale, spec64)
    eager = _eager_lowp(q, k, v, scale, spec)
    err_eager = (eager.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert out.dtype == spec.out_torch_dtype and out.is_contiguous()
    assert err <= 2 * err_eager + 1e-3, f"max err {err:.3e} vs eager {err_eager:.3e}"
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead), "dead rows (lse = -inf) differ"
    assert (out[dead] == 0).all(), "dead rows must be 0"
    live = ~dead
    if live.any():
        lerr = (lse.double()[live] - ref_lse[live]).abs().max().item()
        assert lerr <= 2e-3, f"lse err {lerr:.3e}"
    return err, err_eager


@pytest.mark.parametrize("D", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
def test_head_dims(D, dtype, causal):
    q, k, v = _make(2, 4, 4, 384, 384, D, dtype)
    _check(q, k, v, _spec(causal, out_dtype=str(dtype).split(".")[-1]))


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 113), (1000, 1000), (4097, 4097), (1, 1000),
                                   (17, 4097), (113, 1000), (1000, 113), (4097, 17)])
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("D", [128, 64, 96, 192])  # d64: 192-row tiles, three consumer warpgroups
def test_odd_lengths(sq, sk, causal, D):
    q, k, v = _make(1, 2, 2, sq, sk, D, torch.float16)
    _check(q, k, v, _spec(causal))


@pytest.mark.parametrize("gqa", ["div", "mod"])
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize("D", [128, 64, 96, 192])
def test_gqa(gqa, causal, D):
    q, k, v = _make(2, 8, 2, 300, 517, D, torch.bfloat16)
    _check(q, k, v, _spec(causal, out_dtype="bfloat16", gqa=gqa))


def test_bshd_strides_and_fp32_out():
    q, k, v = _make(2, 4, 4, 257, 263, 64, torch.float16, layout="bshd")
    assert not q.is_contiguous()
    _check(q, k, v, _spec("top_left", out_dtype="float32"))


def test_expanded_kv_head():
    q, k, v = _make(1, 4, 1, 200, 200, 128, torch.float16)
    _check(q, k.expand(1, 4, 200, 128), v.expand(1, 4, 200, 128), _spec("none"))


@pytest.mark.parametrize("wl,wr", [(64, 0), (32, 16), (100, None), (None, 50)])
def test_windows(wl, wr):
    q, k, v = _make(1, 2, 2, 700, 900, 128, torch.bfloat16)
    _check(q, k, v, _spec(window_left=wl, window_right=wr, out_dtype="bfloat16"))


@pytest.mark.parametrize("ablation", [dict(intra_wg=False), dict(pingpong=False), dict(warp_spec=False),
                                      dict(intra_wg=False, pingpong=False, warp_spec=False),
                                      dict(persistent=True), dict(persistent=True, warp_spec=False),
                                      dict(persistent=False)])
@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_ablations(ablation, causal):
    # 2 x 8 heads x 8 m-blocks = 128 tiles: more than one tile per CTA when persistent.  The
    # technique switches run on one CTA per tile (the ablation table's grid; unmasked d128 calls
    # default to the persistent grid, which the persistent cases and the default test).
    ablation = {"persistent": False, **ablation}
    q, k, v = _make(2, 8, 8, 1000, 1000, 128, torch.float16)
    _check(q, k, v, _spec(causal), **ablation)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("b,hq,hk,sq,sk,causal", [(3, 4, 4, 1100, 1100, "top_left"),     # odd m-block count
                                                  (2, 2, 2, 300, 100, "bottom_right"),   # empty tiles
                                                  (2, 8, 2, 640, 1500, "bottom_right"),  # GQA, sq < sk
                                                  (1, 1, 1, 4097, 4097, "top_left")])    # one head, one group
def test_persistent_causal_pairs(d, b, hq, hk, sq, sk, causal):
    """Causal tiles on the persistent grid, taken in pairs of one head's longest and shortest
    m blocks (tile_of): every tile once, whatever the block count's parity or the group size."""
    q, k, v = _make(b, hq, hk, sq, sk, d, torch.float16)
    _check(q, k, v, _spec(causal), persistent=True)


@pytest.mark.parametrize("d,bn", [(128, 160), (128, 128), (256, None)])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("b,hq,hk,sq,sk,dtype,layout", [
    (2, 8, 8, 1000, 1000, torch.float16, "bhsd"),    # 8 m blocks, the last one partial; seqlen_k edge
    (1, 8, 2, 256, 4097, torch.bfloat16, "bshd"),    # GQA, sq != sk, odd keys, strided layout
    (3, 5, 5, 2048, 517, torch.float16, "bhsd"),     # odd head count: clusters never straddle heads
    (1, 2, 2, 113, 113, torch.float16, "bhsd"),      # one m block: runs without the cluster
])
def test_cluster_kv_multicast(d, bn, persistent, b, hq, hk, sq, sk, dtype, layout):
    """K/V multicast (cluster=True): two CTAs on m blocks 2c, 2c + 1 of one head each load half of
    every K/V tile into both; the persistent grid keeps whole clusters.  Odd m-block counts fall
    back to single CTAs (the launcher refuses them)."""
    from fa3_inductor.codegen import cuda_jit
    q, k, v = _make(b, hq, hk, sq, sk, d, dtype, layout)
    spec = _spec("none", out_dtype=str(dtype).split(".")[-1])
    cfg, _ = cuda_impl._launch_config(q, k, v, spec, cluster=True, persistent=persistent,
                                      **({"block_n": bn} if bn else {}))
    assert cfg.cluster == (((sq + 127) // 128) % 2 == 0)
    _check(q, k, v, spec, cluster=True, persistent=persistent, **({"block_n": bn} if bn else {}))
    if cfg.cluster:  # the launcher itself refuses an odd m-block count
        kern = cuda_jit.get_kernel(cfg)
        qo = q[:, :, :sq - 128] if sq > 128 else q
        if ((qo.shape[2] + 127) // 128) % 2:
            out = torch.empty(b, hq, qo.shape[2], v.shape[-1], device=DEV, dtype=dtype)
            lse = torch.empty(b, hq, qo.shape[2], device=DEV, dtype=torch.float32)
            rc = kern.launch(qo.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                             b, hq, hk, qo.shape[2], sk, d, d, *cuda_impl.tma_strides(qo), *cuda_impl.tma_strides(k),
                             *cuda_impl.tma_strides(v), *cuda_impl.tma_strides(out), d ** -0.5, 0, 0, 0, 1, 0,
                             0.0, sk, 0, None, None, None, 0, 0, 0, 0, torch.cuda.current_stream().cuda_stream)
            assert rc == 1001


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", ["none", "top_left"])
@pytest.mark.parametrize("ramp", [0.0, 3.0, 40.0])
def test_lazy_rescale(d, causal, ramp):
    """Lazy O rescale (lazy_rescale): the warp keeps stale row maxima while none grew by more than
    2^8.  Key j's scores are scaled by 1 + ramp * (1 - j / S); the kernel walks the key blocks from
    the last one down, so the maxima grow block after block: within the slack at ramp 3 (stale
    maxima, P up to 2^8), beyond it at ramp 40 (the warp moves them, O rescaled)."""
    S = 2100  # odd length; d128 unmasked takes the 160-key tile from 2k, causal the tile pairs
    q, k, v = _make(1, 4, 4, S, S, d, torch.float16)
    w = 1 + ramp * (1 - torch.arange(S, device=DEV, dtype=torch.float32) / S)
    k = (k.float() * w[None, None, :, None] / (1 + ramp) ** 0.5).to(torch.float16)
    _check(q, k, v, _spec(causal), lazy_rescale=True)


def test_dead_rows_bottom_right():
    # sq > sk with bottom-right causal: the first sq - sk rows see no key.
    q, k, v = _make(1, 2, 2, 300, 100, 128, torch.float16)
    _check(q, k, v, _spec("bottom_right"))


def test_large_scale_values():
    q, k, v = _make(1, 2, 2, 512, 512, 128, torch.float16)
    _check(q * 4, k * 4, v, _spec("none"))


def test_dispatch_prefers_cuda():
    from fa3_inductor.ops import dispatch
    q, k, v = _make(1, 2, 2, 128, 128, 128, torch.float16)
    impl = dispatch.choose(q, k, v, None, _spec("none"), kernel="cuda")
    assert impl is cuda_impl


def test_auto_follows_measured_table():
    """kernel="auto": Triton first where it measured faster (d64 causal up to 4k keys), the CUDA
    template elsewhere (ops/kernel_table.py)."""
    from fa3_inductor.ops import dispatch, triton_impl
    short = _make(1, 2, 2, 2048, 2048, 64, torch.float16)
    long = _make(1, 2, 2, 8192, 8192, 64, torch.float16)
    d128 = _make(1, 2, 2, 2048, 2048, 128, torch.float16)
    assert dispatch.choose(*short, None, _spec("causal"), kernel="auto") is triton_impl
    assert dispatch.choose(*long, None, _spec("causal"), kernel="auto") is cuda_impl
    assert dispatch.choose(*d128, None, _spec("causal"), kernel="auto") is cuda_impl
    # d64 GQA decoding packs the group's heads in the CUDA template: it goes first there.
    decode = _make(4, 8, 2, 1, 1024, 64, torch.float16)
    assert dispatch.choose(*decode, None, _spec("none"), kernel="auto") is cuda_impl


def test_autotune_times_cuda_against_triton(tmp_path, monkeypatch):
    """kernel "auto" under mode="max-autotune" (spec.autotune): the first call of a spec and shape
    bucket times the CUDA template and the Triton one on the real inputs, runs the faster, keeps
    both timings in the on-disk table, and a second call reads the table instead of timing."""
    import json
    from fa3_inductor import autotune
    from fa3_inductor.ops import dispatch, triton_impl
    monkeypatch.setattr(autotune, "_path", lambda: tmp_path / "autotune.json")
    monkeypatch.setattr(autotune, "_table", None)
    q, k, v = _make(1, 4, 4, 1024, 1024, 128, torch.float16)
    spec = _spec("top_left").replace(kernel="auto", autotune=True)
    impl = dispatch.choose(q, k, v, None, spec)
    assert impl in (cuda_impl, triton_impl)
    table = json.loads((tmp_path / "autotune.json").read_text())
    impl_rows = {key: val for key, val in table.items() if key.startswith("impl|")}
    assert len(impl_rows) == 1, table.keys()
    (row,) = impl_rows.values()
    assert set(row["ms"]) == {"cuda", "triton"} and all(t > 0 for t in row["ms"].values()), row
    assert dispatch.name_of(impl) == row["impl"] == min(row["ms"], key=row["ms"].get)
    monkeypatch.setattr(autotune, "_store_raw", lambda *a: pytest.fail("timed a second time"))
    assert autotune.best_impl(q, k, v, spec, {"cuda": cuda_impl, "triton": triton_impl}) == row["impl"]
    out, _ = impl.forward(q, k, v, None, None, None, None, 1 / math.sqrt(128), spec)
    ref, _ = reference.forward(q.double(), k.double(), v.double(), None, None, None, None, 1 / math.sqrt(128),
                               spec.replace(out_dtype="float64"))
    err_eager = (_eager_lowp(q, k, v, 1 / math.sqrt(128), spec).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * err_eager + 1e-3


def test_tile_176():
    # The FA3 paper's hdim-128 non-causal tile (64x176 WGMMA atoms, 11 k-steps in PV).
    q, k, v = _make(2, 4, 4, 1000, 1001, 128, torch.float16)
    _check(q, k, v, _spec("none"), block_n=176, persistent=False)


@pytest.mark.parametrize("B,Hq,Hk,sq,sk,dtype,layout", [(1, 8, 2, 1000, 2500, torch.bfloat16, "bhsd"),
                                                       (2, 4, 4, 113, 2049, torch.float16, "bshd"),
                                                       (1, 4, 4, 4097, 4097, torch.bfloat16, "bhsd")])
def test_wide_key_tile_by_default(B, Hq, Hk, sq, sk, dtype, layout):
    # d128 without masks over >= 2k keys launches 128 x 160 (cuda_jit.launch_policy).
    q, k, v = _make(B, Hq, Hk, sq, sk, 128, dtype, layout=layout)
    spec = _spec("none", out_dtype=str(dtype).split(".")[-1])
    assert cuda_impl._launch_config(q, k, v, spec)[0].block_n == 160
    _check(q, k, v, spec)


@pytest.mark.parametrize("cap", [5.0, 30.0])
@pytest.mark.parametrize("causal,sq,sk,D,dtype", [("none", 300, 517, 128, torch.bfloat16),
                                                  ("bottom_right", 1000, 1000, 64, torch.float16),
                                                  ("top_left", 17, 4097, 256, torch.bfloat16)])
def test_softcap(cap, causal, sq, sk, D, dtype):
    """cap * tanh(s / cap) in the template (Gemma-2 style logit capping), scores scaled x4 so that
    the cap bites; masked entries stay masked after the tanh."""
    q, k, v = _make(2, 4, 2, sq, sk, D, dtype)
    _check(q * 2, k * 2, v, _spec(causal, out_dtype=str(dtype).split(".")[-1], softcap=cap))


@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("B,Hq,Hk,sq,sk", [(2, 4, 4, 384, 384), (1, 8, 2, 113, 1000), (2, 2, 2, 1000, 17),
                                           (3, 8, 2, 1, 777)])
def test_split_head_dims(causal, B, Hq, Hk, sq, sk):
    """q/k head dim 192, v head dim 128 (DeepSeek-style): O and the PV GEMM take V's 128."""
    q, k, v = _make(B, Hq, Hk, sq, sk, 192, torch.bfloat16, Dv=128)
    _check(q, k, v, _spec(causal, out_dtype="bfloat16"))


def _packed_and_not(q, k, v, spec):
    scale = q.shape[-1] ** -0.5
    a, la = cuda_impl.forward(q, k, v, None, None, None, None, scale, spec)
    b, lb = cuda_impl.forward(q, k, v, None, None, None, None, scale, spec, pack_gqa=False)
    return a, la, b, lb


@pytest.mark.parametrize("sq", [1, 3, 17, 64])
@pytest.mark.parametrize("group", [2, 4, 8])
@pytest.mark.parametrize("causal", ["none", "bottom_right"])
@pytest.mark.parametrize("D", [128, 64])
def test_packed_gqa(sq, group, causal, D):
    """Small seqlen_q with GQA: the query heads of a group share tiles (packed_gqa_rows); the
    result meets the bar and, without masks, equals the unpacked launch bit for bit (same key
    blocks in the same order per row)."""
    hk = 2
    q, k, v = _make(3, hk * group, hk, sq, 1000, D, torch.bfloat16)
    spec = _spec(causal, out_dtype="bfloat16")
    assert cuda_impl.packed_gqa_rows(q, hk, spec, 192 if D == 64 else 128) == sq
    _check(q, k, v, spec)
    a, la, b, lb = _packed_and_not(q, k, v, spec)
    if causal == "none":
        assert torch.equal(a, b) and torch.equal(la, lb)
    else:
        assert (a.float() - b.float()).abs().max().item() <= 2e-2


@pytest.mark.parametrize("wl,wr,sq,sk", [(8, 0, 17, 300), (40, None, 5, 1000), (None, 3, 17, 17), (16, 0, 17, 5)])
def test_packed_gqa_windows(wl, wr, sq, sk):
    """Windows and dead rows (sq > sk bottom-right) with packed heads: the masks read the query
    position of each packed row."""
    q, k, v = _make(2, 8, 2, sq, sk, 128, torch.float16)
    spec = AttentionSpec(align="bottom_right", window_left=wl, window_right=wr)
    assert cuda_impl.packed_gqa_rows(q, 2, spec, 128) == sq
    _check(q, k, v, spec)


def test_packed_gqa_strided_and_split():
    """Decoding (sq = 1) from a [B, S, H, D] buffer packs whatever the head stride; 192 / 128 head
    dims pack too; a [B, S, H, D] query with sq > 1 is launched unpacked and stays correct."""
    q, k, v = _make(2, 16, 2, 1, 513, 128, torch.bfloat16, layout="bshd")
    spec = _spec("bottom_right", out_dtype="bfloat16")
    assert cuda_impl.packed_gqa_rows(q, 2, spec, 128) == 1
    _check(q, k, v, spec)
    q, k, v = _make(2, 8, 2, 9, 700, 192, torch.bfloat16, Dv=128)
    assert cuda_impl.packed_gqa_rows(q, 2, spec, 128) == 9
    _check(q, k, v, spec)
    q, k, v = _make(2, 8, 2, 17, 300, 128, torch.bfloat16, layout="bshd")
    assert cuda_impl.packed_gqa_rows(q, 2, spec, 128) == 0
    _check(q, k, v, spec)
