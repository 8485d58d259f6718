"""CPU checks of the CUDA templates: every configuration renders, cache keys separate configs,
supports() declines CPU tensors, and (when nvcc + CUTLASS headers exist) one instantiation
compiles for sm_90a without spills or serialised wgmma."""
from __future__ import annotations

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
        assert cfg.block_n % 16 == 0 and cfg.block_m == 128


def test_config_rejects_unsupported():
    with pytest.raises(ValueError):
        cuda_jit.config_for(80, "float16")
    with pytest.raises(ValueError):
        cuda_jit.config_for(128, "float32")


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
