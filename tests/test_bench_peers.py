"""The FP8 benchmark's cuDNN peer column: the reason when the peer cannot run, and the table."""
import importlib

import torch

from fa3_inductor.bench import cudnn_fp8, fp8_rows


def test_cudnn_fp8_peer_missing_frontend_gives_reason(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "cudnn":
            raise ImportError("no cudnn here")
        return real(name, *a, **k)

    monkeypatch.setattr(cudnn_fp8.importlib, "import_module", fake)
    q = torch.zeros(1, 1, 4, 8).to(torch.float8_e4m3fn)
    ms, note = cudnn_fp8.sdpa_fp8_ms(q, q, q, False, 0.3, time_ms=lambda fn: 1.0)
    assert ms is None and "cudnn-frontend not importable" in note


def _row(**over):
    r = {"kernel": "cuda", "hdim": 256, "seqlen": 8192, "causal": False, "tiles": [128, 128],
         "quant_ms": 0.15, "attn_ms": 0.5, "tflops_attn": 1180.0, "tflops_attn_quant": 900.0,
         "cudnn_fp8_tflops": 1000.0, "vs_cudnn_fp8": 1.18, "cudnn_bf16_tflops": 700.0,
         "cudnn_fp8_relerr": 0.02, "cudnn_note": "cuDNN FP8 via cudnn-frontend 1.32.0, O in bfloat16"}
    r.update(over)
    return r


def test_fp8_table_shows_ratio_and_peer_notes():
    text = fp8_rows.table([_row(), _row(cudnn_fp8_tflops="n/a", vs_cudnn_fp8="n/a", cudnn_fp8_relerr=None,
                                        cudnn_note="torch SDPA: RuntimeError: No available kernel")])
    lines = text.splitlines()
    assert "attn / cuDNN FP8" in lines[0]
    assert "| 1000 | 1.18 | 700 |" in lines[2]
    assert "| n/a | n/a | 700 |" in lines[3]
    assert any("No available kernel" in ln for ln in lines)
    assert any("relative error 2.00e-02-2.00e-02" in ln for ln in lines)


def test_kernels_from_earlier_build_swaps_and_restores(tmp_path):
    from fa3_inductor.bench import other_build
    from fa3_inductor.codegen import cuda_jit
    cfg = cuda_jit.config_for(128, "float16")
    (tmp_path / "cuda").mkdir()
    lib = tmp_path / "cuda" / f"{cfg.name()}_{'ab' * 12}.so"
    lib.write_bytes(b"")
    (tmp_path / "cuda" / f"{cfg.name()}P_{'cd' * 12}.so").write_bytes(b"")  # another instantiation
    original = cuda_jit.compile_config
    with other_build.kernels_from(tmp_path):
        assert cuda_jit.compile_config(cfg) == lib
        other = cuda_jit.config_for(256, "float16")
        try:
            cuda_jit.compile_config(other)
            raise AssertionError("an instantiation missing from the earlier build must raise")
        except FileNotFoundError as exc:
            assert "0 builds of " + other.name() in str(exc)
    assert cuda_jit.compile_config is original


def test_interleaved_medians_and_earlier_rows(monkeypatch, tmp_path):
    from fa3_inductor.bench import other_build
    seen = []
    monkeypatch.setattr(other_build, "kernels_from", lambda root: _Ctx(seen, root))
    # Each round starts one place further along (cuda, sdpa, cuda earlier): the calls run
    # cuda sdpa earlier | sdpa earlier cuda | earlier cuda sdpa.
    times = iter([1.0, 5.0, 2.0, 3.0, 9.0, 4.0, 2.0, 7.0, 3.0])
    med = other_build.interleaved({"cuda": lambda: None, "sdpa": lambda: None}, str(tmp_path), 3,
                                  lambda fn: next(times))
    assert med == {"cuda": 4.0, "sdpa": 3.0, "cuda (earlier)": 2.0}
    assert seen == [str(tmp_path)] * 3


def test_interleaved_skips_variants_the_earlier_build_lacks(monkeypatch, tmp_path):
    """A variant new in this build (no earlier instantiation) keeps its own row; only its
    "(earlier)" row is dropped, and the lookup is not retried every round."""
    from fa3_inductor.bench import other_build
    inside, calls = [False], []

    class Ctx:  # kernels_from(earlier root): lookups there fail for the new variant
        def __init__(self, root):
            pass

        def __enter__(self):
            inside[0] = True

        def __exit__(self, *exc):
            inside[0] = False
            return False

    def cuda_new():
        calls.append(inside[0])
        if inside[0]:
            raise FileNotFoundError("0 builds of the new variant")
        return 1.0

    monkeypatch.setattr(other_build, "kernels_from", Ctx)
    med = other_build.interleaved({"cuda x4": cuda_new, "cuda": lambda: 2.0}, str(tmp_path), 3, lambda fn: fn())
    assert med == {"cuda x4": 1.0, "cuda": 2.0, "cuda (earlier)": 2.0}
    assert calls == [False, True, False, False]  # one failed try on the earlier build, then skipped


class _Ctx:
    def __init__(self, seen, root):
        seen.append(root)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cudnn_fp8_graph_cache_runs_on_this_calls_tensors(monkeypatch):
    """The cuDNN graph is built once per shape; every later call must put its own Q, K, V in the
    variant pack (a pack keeping the first call's tensors made the peer's sanity check compare an
    output of other inputs: relative error ~1.4 on every row after the first of a shape)."""
    class FakeGraph:
        def execute(self, pack, ws):
            self.ran_on = dict(pack)

    g = FakeGraph()
    handles = ("tq", "tk", "tv")
    first = [torch.zeros(1, 1, 4, 8) for _ in range(3)]
    key = cudnn_fp8._key(*first, False, 0.3)
    monkeypatch.setitem(cudnn_fp8._GRAPHS, key, (g, dict(zip(handles, first)), None, torch.zeros(1), "note", handles))
    monkeypatch.setattr(cudnn_fp8.importlib, "import_module", lambda name: None)
    monkeypatch.setattr(cudnn_fp8.torch.cuda, "synchronize", lambda: None)
    later = [torch.ones(1, 1, 4, 8) for _ in range(3)]
    ms, note = cudnn_fp8.sdpa_fp8_ms(*later, False, 0.3, time_ms=lambda fn: 2.0)
    assert ms == 2.0 and note == "note"
    assert all(g.ran_on[h] is t for h, t in zip(handles, later))
    cudnn_fp8.sdpa_fp8_out(*later, False, 0.3)
    assert all(g.ran_on[h] is t for h, t in zip(handles, later))


def test_fp8_variant_rows_quantise_once_per_tile_and_share_the_row_format(monkeypatch):
    """fp8_rows.variant_rows (no GPU: kernel, quantisation, timing and peers replaced): the
    default and each variant get a row in row()'s format, the operands are quantised once per
    distinct tile, and each variant runs on the operands of its own tile."""
    from fa3_inductor.bench import fp8_rows
    from fa3_inductor.fp8 import cuda_attention, quantize
    ran, quantised = [], []
    q = torch.zeros(16, 16, 1024, 128)
    monkeypatch.setattr(fp8_rows, "_inputs", lambda d, s, causal: (16, 16, None, q, q, q, 0.1, None))
    monkeypatch.setattr(cuda_attention, "tiles_for", lambda d, causal, block_n=None, **kw: (128, block_n or 160))
    monkeypatch.setattr(quantize, "quantize_qkv", lambda q, k, v, bm, bn, signs, permute: quantised.append((bm, bn)) or (bm, bn))
    monkeypatch.setattr(cuda_attention, "forward", lambda *a, quantized, **kw: ran.append((quantized, kw)))
    monkeypatch.setattr(fp8_rows, "_time_ms", lambda fn, *a: (fn(), 0.5)[1])
    monkeypatch.setattr(fp8_rows, "_cudnn_fp8", lambda *a: (1.0, "note", 0.01))
    monkeypatch.setattr(fp8_rows, "_cudnn_bf16", lambda *a: 2.0)
    rows = fp8_rows.variant_rows(128, 1024, True, {"persistent": dict(persistent=True), "n224": dict(block_n=224)})
    assert [r["kernel"] for r in rows] == ["cuda default", "cuda persistent", "cuda n224"]
    assert [r["tiles"] for r in rows] == [[128, 160], [128, 160], [128, 224]]
    assert sorted(set(quantised[:2])) == [(128, 160), (128, 224)] and len(quantised) == 3  # 2 tiles + timed pass
    assert ((128, 224), {"block_n": 224}) in ran and ((128, 160), {"persistent": True}) in ran
    flops = 4 * 16 * 16 * 1024 * 1024 * 128 * 0.5
    r = rows[0]
    assert r.keys() == fp8_rows._row("cuda", 128, 1024, 16, 16, True, [], 0.5, 0.5, None, q, q, q, 0.1).keys()
    assert r["tflops_attn"] == flops / 0.5 / 1e9 and r["vs_cudnn_fp8"] == 2.0
    assert r["cudnn_bf16_tflops"] == flops / 2.0 / 1e9 and r["tflops_attn_earlier"] is None
    assert "cuda persistent" in fp8_rows.table(rows)


def test_kernel_grid_providers_agree_and_bad_names_are_refused(capsys):
    import pytest
    from fa3_inductor.bench import __main__ as bench_main, kernels
    assert bench_main.KERNEL_PROVIDERS == kernels.PROVIDERS
    assert set(kernels.PROVIDERS) <= set(kernels._makers())
    with pytest.raises(SystemExit):
        bench_main.main(["--kernels", "--providers", "ours,cudnnx"])
    err = capsys.readouterr().err
    assert "--providers: unknown cudnnx" in err and "ours_atomic" in err


def _fake_grid(monkeypatch, providers):
    """kernels.run over one tiny cell with every maker and the timer faked: (rows, the (provider,
    pass) pairs whose maker ran)."""
    import torch
    from fa3_inductor.bench import kernels
    calls = []
    monkeypatch.setattr(kernels, "_makers", lambda: {p: (lambda *a, p=p: calls.append((p, a[-1])) or (lambda: None))
                                                    for p in kernels.PROVIDERS})
    monkeypatch.setattr(kernels, "grid", lambda quick: iter([(64, False, 16, 1, 1)]))
    monkeypatch.setattr(kernels, "_bench", lambda fn: 1.0)
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: torch.zeros(a, dtype=kw.get("dtype")))
    return kernels.run(providers=providers, passes=("fwd", "bwd")), calls


def test_kernel_grid_atomic_provider_skips_the_forward(monkeypatch):
    """ours_atomic only times the backward (its forward is "ours"): n/a, and no maker call."""
    rows, calls = _fake_grid(monkeypatch, ("ours", "ours_atomic"))
    assert ("ours_atomic", "fwd") not in calls and ("ours_atomic", "bwd") in calls
    import math
    assert math.isnan(rows[0].tflops["ours_atomic"]) and rows[1].tflops["ours_atomic"] > 0


def test_kernel_grid_cuda_provider_times_the_forward_only(monkeypatch):
    """"cuda" (the CUDA template's forward) has no backward of its own: n/a there, no maker call;
    the table gets a cuda/cudnn ratio column beside ours/cudnn."""
    from fa3_inductor.bench import kernels
    rows, calls = _fake_grid(monkeypatch, ("ours", "cuda", "cudnn"))
    assert ("cuda", "fwd") in calls and ("cuda", "bwd") not in calls
    import math
    assert rows[0].tflops["cuda"] > 0 and math.isnan(rows[1].tflops["cuda"])
    head = kernels.table(rows, ("ours", "cuda", "cudnn")).splitlines()[1]
    assert "ours/cudnn" in head and "cuda/cudnn" in head


def test_kernel_grid_cuda_provider_refuses_cpu_with_the_reason():
    import pytest
    import torch
    from fa3_inductor.bench import kernels
    q = torch.zeros(1, 1, 16, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="CUDA template: not a CUDA tensor"):
        kernels._cuda(q, q, q, False, "fwd")


def test_cuda_rows_refuses_a_head_dim_the_template_lacks(capsys):
    import pytest
    from fa3_inductor.bench import cuda_rows
    with pytest.raises(SystemExit):
        cuda_rows.main(["--hdims", "128", "80"])
    err = capsys.readouterr().err
    assert "--hdims" in err and "invalid choice: 80" in err
