"""CPU checks of the CUDA templates: every configuration renders, cache keys separate configs,
supports() declines CPU tensors, and (when nvcc + CUTLASS headers exist) one instantiation
compiles for sm_90a without spills or serialised wgmma."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from fa3_inductor.codegen import cuda_jit
from fa3_inductor.kernels_path import kernels_dir
from fa3_inductor.spec import AttentionSpec


def _all_configs():
    for hd, dt, wl, wr, pp, ow, ws in itertools.product(
            cuda_jit.SUPPORTED_HEAD_DIMS, ("float16", "bfloat16"), (False, True), (False, True),
            (False, True), (False, True), (False, True)):
        yield cuda_jit.config_for(hd, dt, has_wl=wl, has_wr=wr, pingpong=pp, intra_wg=ow, warp_spec=ws)


def test_template_sources_present():
    d = kernels_dir() / "cuda"
    for name in ("fa3_fwd.cu", "fa3_fwd_kernel.cuh", "fa3_softmax.cuh", "fa3_utils.cuh"):
        assert (d / name).is_file(), name


def test_render_every_config():
    names = set()
    for cfg in _all_configs():
        src = cuda_jit.render(cfg)
        assert src.rstrip().endswith('#include "fa3_fwd.cu"')
        for k, v in cfg.defines().items():
            assert f"#define {k} {v}\n" in src
        names.add(cfg.name())
    assert len(names) == len(list(_all_configs()))  # names (cache file names) are unique


def test_template_reads_every_define():
    text = (kernels_dir() / "cuda" / "fa3_fwd.cu").read_text()
    cfg = cuda_jit.config_for(128, "float16")
    for k in cfg.defines():
        assert f"#ifndef {k}" in text, k


def test_tiles_fit_shared_memory():
    # Q + 2 stages of K and V, 16-bit: must stay under 227 KiB (the kernel static_asserts it too).
    for hd in cuda_jit.SUPPORTED_HEAD_DIMS:
        cfg = cuda_jit.config_for(hd, "float16")
        smem = 2 * hd * (cfg.block_m + 2 * cfg.stages * cfg.block_n)
        assert smem <= 227 * 1024, (hd, smem)
        assert cfg.block_n % 16 == 0 and cfg.block_m == (192 if hd == 64 else 128)
        assert cfg.block_m == cuda_jit.block_m_for(hd)


def test_config_rejects_unsupported():
    with pytest.raises(ValueError):
        cuda_jit.config_for(80, "float16")
    with pytest.raises(ValueError):
        cuda_jit.config_for(128, "float32")
    with pytest.raises(ValueError, match="head dim 96 not in"):
        cuda_jit.config_for(96, "bfloat16", fp8=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        cuda_jit.config_for(128, "bfloat16", fp8=True, block_n=80)
    with pytest.raises(ValueError, match="no softcap"):
        cuda_jit.config_for(128, "bfloat16", fp8=True, softcap=True)
    with pytest.raises(ValueError, match="block_m 192"):
        cuda_jit.config_for(128, "float16", block_m=192)
    assert cuda_jit.config_for(64, "float16", block_m=128).block_m == 128  # session 4's d64 tile


def test_fp8_and_softcap_configs():
    """FP8 instantiations: e4m3 operands, dtype names the output; whole k32 key tiles; distinct
    names and defines.  Softcap is a compile-time switch with a run-time cap."""
    f = cuda_jit.config_for(128, "bfloat16", has_wr=True, fp8=True)
    assert f.defines()["FA3_FP8"] == 1 and f.defines()["FA3_DTYPE_BF16"] == 1 and f.block_n % 32 == 0
    assert "e4m3" in f.name() and f.name() != cuda_jit.config_for(128, "bfloat16", has_wr=True).name()
    sc = cuda_jit.config_for(128, "float16", softcap=True)
    assert sc.defines()["FA3_SOFTCAP"] == 1 and "_sc" in sc.name()
    std = cuda_jit.standard_configs(extras=True)
    assert sum(c.fp8 for c in std) >= 8 and any(c.softcap for c in std)
    assert len({c.name() for c in std}) == len(std)
    for hd in cuda_jit.FP8_HEAD_DIMS:  # Q + 2 stages of K and V^T, one byte each
        cfg = cuda_jit.config_for(hd, "bfloat16", fp8=True)
        assert hd * (cfg.block_m + 4 * cfg.block_n) <= 227 * 1024


def test_split_head_dims_config():
    """q/k head dim 192 with v head dim 128: its own define, name and tile; other splits and FP8
    splits are refused with the allowed pairs in the message."""
    cfg = cuda_jit.config_for(192, "bfloat16", has_wr=True, head_dim_v=128)
    assert cfg.defines()["FA3_HDIM_V"] == 128 and cfg.dv == 128 and "d192v128" in cfg.name()
    assert 2 * (cfg.block_m * 192 + cfg.stages * cfg.block_n * (192 + 128)) <= 227 * 1024
    assert "FA3_HDIM_V" in cuda_jit.render(cfg)
    same = cuda_jit.config_for(128, "float16", head_dim_v=128)
    assert same == cuda_jit.config_for(128, "float16") and "FA3_HDIM_V" not in same.defines()
    with pytest.raises(ValueError, match=r"\(192, 128\)"):
        cuda_jit.config_for(128, "float16", head_dim_v=64)
    with pytest.raises(ValueError, match="16-bit"):
        cuda_jit.config_for(192, "bfloat16", fp8=True, head_dim_v=128)
    assert any(c.head_dim_v == 128 for c in cuda_jit.standard_configs(extras=True))


def test_packed_gqa_config():
    """Packed GQA rows are an instantiation of their own (the unpacked kernels keep their registers);
    FP8 has none."""
    cfg = cuda_jit.config_for(128, "bfloat16", has_wr=True, pack_gqa=True)
    plain = cuda_jit.config_for(128, "bfloat16", has_wr=True)
    assert cfg.defines()["FA3_PACK_GQA"] == 1 and "FA3_PACK_GQA" not in plain.defines()
    assert "_gqa" in cfg.name() and cfg.name() != plain.name()
    with pytest.raises(ValueError, match="packed GQA"):
        cuda_jit.config_for(128, "bfloat16", fp8=True, pack_gqa=True)
    text = (kernels_dir() / "cuda" / "fa3_fwd.cu").read_text()
    assert "#ifndef FA3_PACK_GQA" in text and "#ifndef FA3_HDIM_V" in text


@pytest.mark.parametrize("D,Sq,Sk,spec,Hk,ablation,block_n", [
    (128, 4096, 4096, AttentionSpec(), 4, {}, 160),                      # long, unmasked: wide key tile
    (128, 1024, 1024, AttentionSpec(), 4, {}, 128),                      # shorter key range
    (128, 2048, 2048, AttentionSpec(), 4, {}, 160),
    (128, 4096, 4096, AttentionSpec(window_right=0), 4, {}, 128),         # causal keeps 128 keys
    (128, 1, 8192, AttentionSpec(), 1, {}, 128),                         # packed GQA decoding
    (128, 4096, 4096, AttentionSpec(), 4, {"block_n": 176}, 176),        # benchmark override wins
    (128, 4096, 4096, AttentionSpec(), 4, {"stages": 3}, 128),
    (256, 8192, 8192, AttentionSpec(), 4, {}, 80),                       # other head dims unchanged
    (64, 8192, 8192, AttentionSpec(), 4, {}, 128),
])
def test_launch_tile_for_long_unmasked_keys(D, Sq, Sk, spec, Hk, ablation, block_n):
    from fa3_inductor.ops import cuda_impl
    q = torch.randn(1, 4, Sq, D, dtype=torch.float16)
    k = torch.randn(1, Hk, Sk, D, dtype=torch.float16)
    cfg, _ = cuda_impl._launch_config(q, k, k, spec, **ablation)
    assert cfg.block_n == block_n
    assert cfg in cuda_jit.standard_configs(extras=True) or ablation, "the tiles the product launches are prebuilt"


@pytest.mark.parametrize("D,Sq,Sk,spec,Hk,ablation,persistent", [
    (128, 4096, 4096, AttentionSpec(), 4, {}, True),                       # unmasked d128: persistent grid
    (128, 1024, 1024, AttentionSpec(), 4, {}, True),                       # with either key tile
    (128, 8192, 8192, AttentionSpec(), 4, {}, False),                      # long tiles: one CTA per tile
    (128, 64, 8191, AttentionSpec(), 4, {}, True),                         # decided by the keys
    (128, 4096, 4096, AttentionSpec(out_dtype="float32"), 4, {}, False),   # fp32 O: no staging to overlap
    (128, 4096, 4096, AttentionSpec(window_right=0), 4, {}, True),         # causal below 12k keys: pairs
    (128, 16384, 16384, AttentionSpec(window_right=0), 4, {}, False),      # causal from 12k: one CTA per tile
    (128, 4096, 4096, AttentionSpec(window_left=64), 4, {}, False),        # sliding windows: one CTA per tile
    (64, 2048, 2048, AttentionSpec(), 4, {}, True),                        # unmasked d64 below 4k keys
    (64, 2048, 2048, AttentionSpec(window_right=0), 4, {}, False),         # causal d64: one CTA per tile
    (128, 1, 8192, AttentionSpec(), 1, {}, False),                         # packed GQA decoding
    (128, 4096, 4096, AttentionSpec(), 4, {"persistent": False}, False),   # benchmark override wins
    (256, 8192, 8192, AttentionSpec(), 4, {}, False),
    (64, 8192, 8192, AttentionSpec(), 4, {}, False),
])
def test_launch_grid_follows_launch_policy(D, Sq, Sk, spec, Hk, ablation, persistent):
    from fa3_inductor.ops import cuda_impl
    q = torch.randn(1, 4, Sq, D, dtype=torch.bfloat16)
    k = torch.randn(1, Hk, Sk, D, dtype=torch.bfloat16)
    cfg, _ = cuda_impl._launch_config(q, k, k, spec, **ablation)
    assert cfg.persistent == persistent
    if not (ablation or cfg.out_fp32):  # (fp32-out instantiations build on first use)
        assert cfg in cuda_jit.standard_configs(extras=True), "the configs the product launches are prebuilt"


def _gqa_q(B, Hq, Sq, D, layout="bhsd"):
    if layout == "bshd":
        return torch.randn(B, Sq, Hq, D).transpose(1, 2)
    return torch.randn(B, Hq, Sq, D)


@pytest.mark.parametrize("Hq,Hk,Sq,layout,mapping,expect", [
    (8, 2, 1, "bhsd", "div", 1),      # decoding: one row per head, 4 heads per tile
    (8, 2, 1, "bshd", "div", 1),      # Sq = 1 packs whatever the head stride
    (8, 2, 17, "bhsd", "div", 17),    # heads stored after one another's queries
    (8, 2, 64, "bhsd", "div", 64),    # 4 x 64 rows = 2 tiles instead of 4
    (8, 2, 17, "bshd", "div", 0),     # rows of a group not one stride apart
    (8, 2, 1, "bhsd", "mod", 0),      # heads of a group not consecutive
    (4, 4, 1, "bhsd", "div", 0),      # no group
    (8, 2, 100, "bhsd", "div", 0),    # 4 x 100 rows still need 4 tiles
    (8, 2, 300, "bhsd", "div", 0),    # long queries fill their own tiles
])
def test_packed_gqa_rows(Hq, Hk, Sq, layout, mapping, expect):
    from fa3_inductor.ops import cuda_impl
    q = _gqa_q(2, Hq, Sq, 128, layout)
    spec = AttentionSpec(gqa_mapping=mapping)
    assert cuda_impl.packed_gqa_rows(q, Hk, spec, 128) == expect
    assert cuda_impl.packed_gqa_rows(q, Hk, spec.replace(fp8=True), 128) == 0


@pytest.mark.parametrize("Sq,layout", [(1, "bshd"), (1, "bhsd"), (17, "bhsd")])
def test_packed_view_maps_rows_to_heads(Sq, layout):
    """Row g * Sq + s of kv head h of the packed view is query s of head h * group + g."""
    from fa3_inductor.ops import cuda_impl
    B, Hq, Hk, D = 2, 8, 2, 16
    q = _gqa_q(B, Hq, Sq, D, layout)
    pv = cuda_impl._packed_view(q, Hk, Sq)
    group = Hq // Hk
    assert pv.shape == (B, Hk, group * Sq, D) and pv.data_ptr() == q.data_ptr()
    want = q.reshape(B, Hk, group, Sq, D).reshape(B, Hk, group * Sq, D)
    assert torch.equal(pv, want)


def test_cache_key_separates_configs(monkeypatch):
    if cuda_jit.toolchain_problem():
        pytest.skip(cuda_jit.toolchain_problem())
    a = cuda_jit.cache_key(cuda_jit.config_for(128, "float16"))
    b = cuda_jit.cache_key(cuda_jit.config_for(128, "float16", has_wr=True))
    c = cuda_jit.cache_key(cuda_jit.config_for(128, "float16"))
    assert a != b and a == c


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FA3_INDUCTOR_CACHE", str(tmp_path))
    assert cuda_jit.cache_dir() == tmp_path / "cuda"


def test_supports_declines_cpu():
    from fa3_inductor.ops import cuda_impl
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    assert isinstance(cuda_impl.supports(q, q, q, None, AttentionSpec()), str)


def test_missing_headers_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("FA3_CUTLASS_INCLUDE", str(tmp_path))
    cuda_jit.cutlass_include.cache_clear()
    try:
        import cutlass_library  # noqa: F401
        pytest.skip("nvidia-cutlass installed: the pip headers are found regardless")
    except ImportError:
        with pytest.raises(cuda_jit.CudaToolchainUnavailable, match="CUTLASS"):
            cuda_jit.cutlass_include()
    finally:
        cuda_jit.cutlass_include.cache_clear()


@pytest.mark.slow
def test_compile_one_sm90a():
    """nvcc on this machine (no GPU needed): hdim 128 fp16 causal, full FA3 feature set."""
    if cuda_jit.toolchain_problem():
        pytest.skip(cuda_jit.toolchain_problem())
    cfg = cuda_jit.config_for(128, "float16", has_wr=True)
    so = cuda_jit.compile_config(cfg)
    assert so.is_file()
    rep = cuda_jit.ptxas_report(cfg)
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep["log"][-2000:]
    assert not rep["wgmma_serialized"], rep["log"][-2000:]


@pytest.mark.slow
def test_compile_fp8_and_softcap_sm90a():
    """The FP8 (e4m3, K-major V^T, permuted P), softcap and 192 / 128 head-dim instantiations
    build for sm_90a."""
    if cuda_jit.toolchain_problem():
        pytest.skip(cuda_jit.toolchain_problem())
    for cfg in (cuda_jit.config_for(128, "bfloat16", fp8=True, has_wr=True),
                cuda_jit.config_for(128, "bfloat16", has_wr=True, softcap=True),
                cuda_jit.config_for(192, "bfloat16", has_wr=True, head_dim_v=128)):
        rep = cuda_jit.ptxas_report(cfg)
        assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, rep["log"][-2000:]
        assert not rep["wgmma_serialized"], rep["log"][-2000:]
    # The non-causal FP8 d128 tile (128 x 224) keeps 12 bytes outside the GMMA loop, measured
    # faster than the spill-free 128 x 192 (scripts/compile_cuda_sm90.py's SPILL_ALLOWANCE).
    cfg = cuda_jit.config_for(128, "bfloat16", fp8=True)
    assert cfg.block_n == 224
    rep = cuda_jit.ptxas_report(cfg)
    assert rep["spill_stores"] <= 12 and rep["spill_loads"] <= 12, rep["log"][-2000:]
    assert not rep["wgmma_serialized"], rep["log"][-2000:]


# ---- the kernel's block-skipping logic (block_range / block_needs_mask in fa3_fwd_kernel.cuh),
# mirrored in Python and checked against the reference keep-mask: a skipped block must hold no
# kept key, and a block run without masking must hold only kept keys (for rows < sq).
def _block_range(sq, sk, off, wl, wr, m, BM, BN):
    row_lo, row_hi = m * BM, min(sq, m * BM + BM) - 1
    n_min, n_max = 0, (sk + BN - 1) // BN
    if wr is not None:
        x = row_hi + off + wr + 1
        n_max = 0 if x <= 0 else min(n_max, (x + BN - 1) // BN)
    if wl is not None:
        y = row_lo + off - wl
        n_min = 0 if y <= 0 else y // BN
    return n_min, n_max


def _needs_mask(sk, off, wl, wr, m, n, BM, BN):
    row_lo, row_hi = m * BM, m * BM + BM - 1
    need = (n + 1) * BN > sk
    if wr is not None:
        need |= (n + 1) * BN - 1 > row_lo + off + wr
    if wl is not None:
        need |= n * BN < row_hi + off - wl
    return need


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 300), (300, 17), (257, 513), (1000, 1000), (129, 80)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("wl,wr", [(None, None), (None, 0), (64, 0), (5, 17), (100, None), (None, 50)])
@pytest.mark.parametrize("BN", [80, 128])
def test_block_skipping_matches_reference(sq, sk, align, wl, wr, BN):
    from fa3_inductor import reference
    BM = 128
    spec = AttentionSpec(align=align, window_left=wl, window_right=wr)
    keep = reference.keep_mask(spec, torch.arange(sq), sq, sk, "cpu", None, None)
    keep = torch.ones(sq, sk, dtype=torch.bool) if keep is None else keep.view(sq, sk)
    off = sk - sq if align == "bottom_right" else 0
    for m in range((sq + BM - 1) // BM):
        rows = keep[m * BM:(m + 1) * BM]
        n_min, n_max = _block_range(sq, sk, off, wl, wr, m, BM, BN)
        for n in range((sk + BN - 1) // BN):
            blk = rows[:, n * BN:(n + 1) * BN]
            if not (n_min <= n < n_max):
                assert not blk.any(), (m, n, "skipped block has kept keys")
            elif not _needs_mask(sk, off, wl, wr, m, n, BM, BN):
                assert blk.all() and blk.shape[1] == BN, (m, n, "unmasked block has masked keys")


def _run_host_check(name: str, tmp_path) -> str:
    """Build tests/cuda_host/<name>.cu against the kernel headers (host code only, no GPU), run
    it, and return its output once it exits 0."""
    import pathlib
    import subprocess
    if cuda_jit.toolchain_problem():
        pytest.skip(cuda_jit.toolchain_problem())
    src = pathlib.Path(__file__).parent / "cuda_host" / f"{name}.cu"
    exe = tmp_path / name
    cmd = [cuda_jit.find_nvcc(), "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
           f"-I{cuda_jit.cutlass_include()}", f"-I{kernels_dir() / 'cuda'}", str(src), "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    return out.stdout


@pytest.mark.slow
def test_layout_helpers_match_cute(tmp_path):
    """Host-only program (no GPU): acc_rowcol / acc_as_operand_a agree with CuTe's WGMMA partitions
    for every consumer thread, i.e. P can be fed from the S registers to the PV GEMM as is."""
    out = _run_host_check("layout_check", tmp_path)
    assert out.count("OK") == 8, out


@pytest.mark.slow
def test_persistent_schedule_covers_every_tile_once(tmp_path):
    """Host-only program (no GPU): the kernel's own tile_of / decode_tile, run for every CTA of
    the persistent grid the launcher starts, visit each tile once; causal pairs are one head's
    m blocks i and n-1-i (equal cost, so the CTAs stay in step)."""
    out = _run_host_check("schedule_check", tmp_path)
    assert out.count("OK") == 8 and "FAIL" not in out, out


def test_launch_policy():
    """Key tile and grid per (mask kind, head dim, keys); every choice it can make is prebuilt."""
    lp = cuda_jit.launch_policy
    assert cuda_jit.mask_kind(False, False) == "none" and cuda_jit.mask_kind(False, True) == "causal"
    assert cuda_jit.mask_kind(True, False) == "window" and cuda_jit.mask_kind(True, True) == "window"
    assert lp(128, 1024, mask="none")[:2] == (None, True)
    assert lp(128, 2048, mask="none")[:2] == (160, True)
    assert lp(128, 8192, mask="none")[:2] == (160, False)
    assert lp(128, 4096, mask="window") == (None, False, False)
    assert lp(192, 4096, mask="none", head_dim_v=128) == (None, False, False)
    assert not any(lp(hd, 4096, mask="causal")[2] for hd in (64, 128, 256)), "K/V multicast: unmasked only"
    with pytest.raises(ValueError, match="mask 'sliding'"):
        lp(128, 4096, mask="sliding")
    built = {c.name() for c in cuda_jit.standard_configs()}
    for hd in (64, 128, 256):
        for mask in ("none", "causal"):
            for sk in (512, 1024, 2048, 4096, 8192, 16384):
                bn, persistent, cluster = lp(hd, sk, mask=mask)
                for dt in ("float16", "bfloat16"):
                    cfg = cuda_jit.config_for(hd, dt, has_wr=mask == "causal", block_n=bn, persistent=persistent,
                                              cluster=cluster)
                    assert cfg.name() in built, (hd, mask, sk, cfg.name())
                    if cluster:  # an odd m-block count runs the same tile without it
                        assert dataclasses.replace(cfg, cluster=False).name() in built


@pytest.mark.parametrize("kw,match", [
    (dict(has_wr=True), "cluster"), (dict(has_wl=True), "cluster"), (dict(pack_gqa=True), "cluster"),
    (dict(head_dim=64), "128-row"),
])
def test_cluster_config_rejects_what_it_cannot_pair(kw, match):
    """K/V multicast needs both CTAs of a cluster to walk the same key blocks: no masks, no packed
    rows, 128-row tiles (d64's default tile has 192 rows)."""
    kw = {"head_dim": 128, **kw}
    with pytest.raises(ValueError, match=match):
        cuda_jit.config_for(kw.pop("head_dim"), "float16", cluster=True, **kw)


@pytest.mark.parametrize("Sq,spec,want", [
    (1000, AttentionSpec(), True),                  # 8 m blocks
    (1100, AttentionSpec(), False),                 # 9: one CTA would have no partner
    (128, AttentionSpec(), False),                  # 1
    (1000, AttentionSpec(window_right=0), False),   # causal: the m blocks' key ranges differ
])
def test_cluster_launch_needs_even_m_blocks(Sq, spec, want):
    from fa3_inductor.ops import cuda_impl
    q = torch.randn(1, 4, Sq, 128, dtype=torch.float16)
    k = torch.randn(1, 4, 2048, 128, dtype=torch.float16)
    cfg, _ = cuda_impl._launch_config(q, k, k, spec, cluster=True)
    assert cfg.cluster == want
    if want:
        src = cuda_jit.render(cfg)
        assert "#define FA3_CLUSTER_M 2" in src and cfg.name().endswith("_c2_powP")
    cfg, _ = cuda_impl._launch_config(q, k, k, spec, cluster=False)
    assert not cfg.cluster


def test_fp8_grid_follows_policy():
    """FP8 d128 causal below 8k keys runs on the persistent grid (pairs); everything else, and an
    explicit benchmark override, keeps its grid; the instantiations it picks are prebuilt."""
    from fa3_inductor.fp8 import cuda_attention
    q = torch.randn(1, 4, 2048, 128, dtype=torch.bfloat16)
    causal, plain = AttentionSpec(window_right=0, out_dtype="bfloat16"), AttentionSpec(out_dtype="bfloat16")
    assert cuda_attention.config_for_call(q, causal, 4096).persistent
    assert not cuda_attention.config_for_call(q, causal, 8192).persistent
    assert not cuda_attention.config_for_call(q, plain, 2048).persistent
    assert not cuda_attention.config_for_call(q, causal, 2048, persistent=False).persistent
    assert not cuda_attention.config_for_call(q[..., :64].contiguous(), causal, 2048).persistent
    with pytest.raises(ValueError, match="fp8_persistent_grid: mask 'sliding'"):
        cuda_jit.fp8_persistent_grid(128, 2048, mask="sliding")
    built = set(cuda_jit.standard_configs())
    for sk in (1024, 4096, 16384):
        for spec in (causal, plain):
            assert cuda_attention.config_for_call(q, spec, sk) in built


def test_lpt_group_divides_and_fits_l2():
    """Causal tile order: (batch, head) pairs per longest-first group divide B*Hq and keep the
    group's K/V within the L2 budget; GQA heads share K/V; at least one pair per group."""
    from fa3_inductor.ops.cuda_impl import _L2_KV_BUDGET, lpt_group
    for b, hq, hk, sk, d in [(8, 16, 16, 2048, 128), (1, 16, 16, 16384, 256), (3, 7, 7, 100, 64),
                             (2, 32, 8, 4096, 128), (100000, 1, 1, 1, 128), (1, 1, 1, 10 ** 6, 256)]:
        g = lpt_group(b, hq, hk, sk, d, 2)
        assert (b * hq) % g == 0 and g >= 1
        assert g == 1 or g * 2 * sk * d * 2 * hk / hq <= _L2_KV_BUDGET
    assert lpt_group(8, 16, 16, 2048, 128, 2) == 16           # 1 MiB of K/V per head: 24 fit, 16 divides 128
    assert lpt_group(2, 32, 8, 4096, 128, 2) == 32            # GQA 4:1: 0.5 MiB per query head, 48 fit


def test_exp_poly_config():
    """exp_poly: every n-th exponential of a row on the FMA pipe, a compile-time switch with its
    own define and name; out-of-range values are refused naming the argument."""
    cfg = cuda_jit.config_for(128, "float16", exp_poly=4)
    plain = cuda_jit.config_for(128, "float16", exp_poly=0)
    assert cfg.defines()["FA3_EXP_POLY"] == 4 and "FA3_EXP_POLY" not in plain.defines()
    assert "_x4" in cfg.name() and cfg.name() != plain.name()
    assert "#ifndef FA3_EXP_POLY" in (kernels_dir() / "cuda" / "fa3_fwd.cu").read_text()
    for bad in (-1, 17, 2.5):
        with pytest.raises(ValueError, match="exp_poly"):
            cuda_jit.config_for(128, "float16", exp_poly=bad)


def test_lazy_rescale_config():
    """lazy_rescale: its own define and name; on by default where measured (V head dim 256,
    16-bit), off elsewhere and refused for FP8 (whose O moves to every V block's scale)."""
    d256 = cuda_jit.config_for(256, "float16")
    assert d256.lazy_rescale and d256.defines()["FA3_LAZY_RESCALE"] == 1 and "_lz" in d256.name()
    assert 256 in cuda_jit.LAZY_RESCALE_HEAD_DIMS_V
    for off in (cuda_jit.config_for(128, "float16"), cuda_jit.config_for(64, "bfloat16", has_wr=True),
                cuda_jit.config_for(256, "float16", lazy_rescale=False),
                cuda_jit.config_for(256, "float16", fp8=True)):
        assert not off.lazy_rescale and "FA3_LAZY_RESCALE" not in off.defines() and "_lz" not in off.name()
    assert cuda_jit.config_for(128, "float16", lazy_rescale=True).lazy_rescale
    with pytest.raises(ValueError, match="lazy_rescale"):
        cuda_jit.config_for(128, "float16", fp8=True, lazy_rescale=True)
    assert "#ifndef FA3_LAZY_RESCALE" in (kernels_dir() / "cuda" / "fa3_fwd.cu").read_text()


def _online_softmax_emulated(s, block, lazy_log2, warp_rows=16):
    """OnlineSoftmax over key blocks (last block first, as the kernel walks them) in float64, with
    the lazy rule of fa3_softmax.cuh: a warp (warp_rows rows) keeps its stale maxima unless one
    grew by more than lazy_log2 (0: always take the new maxima).  Returns (P V / l, LSE) for
    V = identity, i.e. the normalised probabilities, and how many block steps rescaled O."""
    import numpy as np
    rows, n = s.shape
    m = np.full(rows, -np.inf)
    l = np.zeros(rows)
    o = np.zeros((rows, n))
    rescales = 0
    for b0 in reversed(range(0, n, block)):
        blk = s[:, b0:b0 + block]
        m_new = np.maximum(m, blk.max(axis=1))
        for w in range(0, rows, warp_rows):
            sl = slice(w, w + warp_rows)
            first = np.all(np.isneginf(m[sl])) and b0 + block >= n
            update = first or not lazy_log2 or bool(np.any(m_new[sl] > m[sl] + lazy_log2))
            if not update:
                m_new[sl] = m[sl]
            elif not first:
                rescales += 1
        m_sub = np.where(np.isneginf(m_new), 0.0, m_new)
        alpha = np.where(np.isneginf(m), 1.0, np.exp2(m - m_sub))
        p = np.exp2(blk - m_sub[:, None])
        o *= alpha[:, None]
        o[:, b0:b0 + block] += p
        l = l * alpha + p.sum(axis=1)
        m = m_new
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(l[:, None] > 0, o / l[:, None], 0.0)
        lse = np.where(l > 0, m + np.log2(l), -np.inf)
    return out, lse, rescales


def test_lazy_rescale_matches_eager_softmax():
    """The lazy rule changes nothing but rounding: P / l and the LSE equal the eager online
    softmax's, with fully masked rows (all -inf) and rows whose first kept key arrives late; with
    scores that grow block after block it rescales only when a max grew by more than 2^8."""
    import numpy as np
    rng = np.random.default_rng(0)
    rows, n, block = 32, 1000, 160
    ramp = np.linspace(12.0, 0.0, n)  # log2 domain; the walk starts at the last (smallest) keys
    s = rng.standard_normal((rows, n)) * 2 + ramp[None, :] * rng.uniform(0, 4, (rows, 1))
    s[3] = -np.inf                      # no kept key: out 0, LSE -inf
    s[5, 200:] = -np.inf                # first kept key in the last block walked
    s[7, :900] = -np.inf                # kept keys only in the first block walked
    eager_out, eager_lse, eager_rescales = _online_softmax_emulated(s, block, 0)
    lazy_out, lazy_lse, lazy_rescales = _online_softmax_emulated(s, block, 8)
    with np.errstate(invalid="ignore"):
        ref = np.exp2(s - s.max(axis=1, keepdims=True))
        ref = np.where(np.isneginf(s.max(axis=1, keepdims=True)), 0.0, ref / ref.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(lazy_out, ref, atol=1e-12)
    np.testing.assert_allclose(eager_out, ref, atol=1e-12)
    assert np.isneginf(lazy_lse[3]) and np.all(lazy_out[3] == 0)
    finite = np.isfinite(eager_lse)
    np.testing.assert_allclose(lazy_lse[finite], eager_lse[finite], rtol=1e-12)
    assert 0 < lazy_rescales < eager_rescales


def _exp2_poly3_emulated(x, coeffs):
    """fa3_utils.cuh's exp2_poly3 in numpy float32: clamp, split off floor(x), polynomial of the
    fraction, floor(x) added to the exponent field (the device takes floor(x) from a round-down
    add of 1.5 * 2^23, which is exact for |x| < 2^22)."""
    import numpy as np
    x = np.maximum(np.asarray(x, dtype=np.float32), np.float32(-126))
    n = np.floor(x)
    f = (x - n).astype(np.float32)
    p = np.float32(coeffs[0])
    for c in coeffs[1:]:
        p = (p.astype(np.float64) * f + np.float32(c)).astype(np.float32)  # fmaf: one rounding
    p = (p.astype(np.float64) * f + 1.0).astype(np.float32)
    bits = p.view(np.int32) + (n.astype(np.int32) << 23)
    return bits.view(np.float32)


def test_exp2_poly3_accuracy():
    """The polynomial exp2 of the CUDA softmax (coefficients read from the kernel source) is within
    1e-4 relative of 2^x over the softmax's range, gives a normal tiny value (not NaN) for -inf,
    and is exact at integers."""
    import re
    import numpy as np
    src = (kernels_dir() / "cuda" / "fa3_utils.cuh").read_text()
    body = src[src.index("float exp2_poly3("):]
    coeffs = [float(c) for c in re.findall(r"(-?\d+\.\d+)f", body.split("return")[0])
              if c not in ("12582912.", "126.")]
    coeffs = [c for c in coeffs if 0 < c < 1]  # c3, c2, c1 in Horner order
    assert len(coeffs) == 3, coeffs
    x = np.concatenate([np.linspace(-126, 0, 200001, dtype=np.float32), -np.logspace(-8, 0, 1001, dtype=np.float32)])
    y = _exp2_poly3_emulated(x, coeffs)
    rel = np.abs(y.astype(np.float64) / np.exp2(x.astype(np.float64)) - 1)
    assert rel.max() < 1e-4, rel.max()
    ints = np.arange(-126, 1, dtype=np.float32)
    assert np.array_equal(_exp2_poly3_emulated(ints, coeffs), np.exp2(ints))
    tiny = _exp2_poly3_emulated(np.array([-np.inf, -1e30], dtype=np.float32), coeffs)
    assert np.all(tiny == np.float32(2.0 ** -126))
