"""The Gluon forward (ops/gluon_fwd.py, kernels/triton/gluon_fwd.py.tmpl) on CPU: which calls
triton_impl.gluon_supports() routes to it and why not the others, the template's loading and
cache key, explain()'s report, and an AOT compile for sm_90a (no GPU needed) with the
structure the kernel is for: warp specialisation (setmaxnreg), wgmma, 4-D TMA, no spills.
The numerics run on the H100: tests/gpu/test_triton_gpu.py (test_gluon_*)."""
import pytest
import torch

import fa3_inductor
from fa3_inductor import config_check
from fa3_inductor.codegen import triton_configs, triton_render
from fa3_inductor.ops import gluon_fwd, triton_impl
from fa3_inductor.spec import AttentionSpec
from helpers import assert_keyed_by_source_and_triton

CAUSAL = AttentionSpec(window_right=0)


@pytest.fixture
def sm90(monkeypatch):
    """CPU tensors pass the device check (an sm_90 GPU is mocked)."""
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)


def _qkv(B=2, Hq=4, Hk=4, Sq=33, Sk=33, D=128, Dv=None, dtype=torch.float16):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype)
    k = torch.randn(B, Hk, Sk, D, dtype=dtype)
    v = torch.randn(B, Hk, Sk, Dv or D, dtype=dtype)
    return q, k, v


def _why(q, k, v, spec=CAUSAL, bias=None, kp=None, slopes=None, seed=None, **kw):
    return triton_impl.gluon_supports(q, k, v, bias, kp, slopes, seed, spec, **kw)


def test_accepts_the_supported_calls(sm90):
    for D in (128, 256):
        for dtype in (torch.float16, torch.bfloat16):
            out = "float16" if dtype == torch.float16 else "bfloat16"
            for spec in (AttentionSpec(out_dtype=out), AttentionSpec(window_right=0, out_dtype=out),
                         AttentionSpec(window_right=0, align="bottom_right", out_dtype=out)):
                assert _why(*_qkv(D=D, dtype=dtype), spec=spec, scale=0.1) is None
    # GQA 4:1 and 8:1 ("div"), Sq != Sk both ways, length 1
    assert _why(*_qkv(Hq=8, Hk=2, Sq=113, Sk=1000)) is None
    assert _why(*_qkv(Hq=8, Hk=1, Sq=1000, Sk=113)) is None
    assert _why(*_qkv(Sq=1, Sk=1)) is None
    # [B, S, H, D].transpose(1, 2): what HF / nanoGPT models hand over, no copy needed
    q, k, v = (torch.randn(2, 77, 4, 128, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous() and _why(q, k, v) is None


@pytest.mark.parametrize("change,needle", [
    (dict(bias=torch.zeros(2, 4, 33, 33, dtype=torch.float16), spec=AttentionSpec(mask_kind="additive")),
     "additive mask/bias"),
    (dict(bias=torch.ones(2, 4, 33, 33, dtype=torch.bool), spec=AttentionSpec(mask_kind="bool")), "bool mask"),
    (dict(kp=torch.ones(2, 33, dtype=torch.bool), spec=AttentionSpec(key_padding=True)), "key padding"),
    (dict(slopes=torch.ones(4), spec=AttentionSpec(alibi="linear")), "ALiBi"),
    (dict(spec=AttentionSpec(softcap=30.0)), "softcap"),
    (dict(seed=torch.zeros(2, dtype=torch.int64), spec=AttentionSpec(dropout_p=0.1)), "dropout"),
    (dict(spec=AttentionSpec(window_left=16, window_right=0)), "window"),
    (dict(spec=AttentionSpec(window_right=4)), "window"),
    (dict(spec=AttentionSpec(out_dtype="float32")), "out dtype float32"),
    (dict(scale=-0.5), "scale"),
    (dict(config=triton_configs.FwdConfig(128, 64, 8, 2)), "explicit tile config"),
])
def test_rejections_name_the_reason(sm90, change, needle):
    q, k, v = _qkv()
    why = _why(q, k, v, **change)
    assert why is not None and needle in why, why


@pytest.mark.parametrize("shapes,needle", [
    (dict(D=64), "head dims"), (dict(D=96), "head dims"), (dict(D=128, Dv=256), "head dims"),
    (dict(dtype=torch.float32), "dtype"), (dict(Hq=6, Hk=4), "multiple of kv heads"),
])
def test_rejects_shapes_and_dtypes(sm90, shapes, needle):
    why = _why(*_qkv(**shapes), spec=AttentionSpec(out_dtype="float32" if "dtype" in shapes else "float16"))
    assert why is not None and needle in why, why


def test_rejects_mod_gqa_and_non_tma_layouts(sm90):
    q, k, v = _qkv(Hq=8, Hk=2)
    assert "GQA mapping 'mod'" in _why(q, k, v, spec=AttentionSpec(gqa_mapping="mod"))
    assert _why(*_qkv(), spec=AttentionSpec(gqa_mapping="mod")) is None   # no GQA: mapping moot
    # a row stride of 132 elements (264 bytes) is no 16-byte multiple
    q = torch.randn(2, 4, 33, 132, dtype=torch.float16)[..., :128]
    assert "q strides" in _why(q, *_qkv()[1:])
    # base not 16-byte aligned
    k = torch.randn(2 * 4 * 33 * 128 + 1, dtype=torch.float16)[1:].view(2, 4, 33, 128)
    assert "k strides" in _why(_qkv()[0], k, _qkv()[2])
    # an expand()ed K/V (stride 0 over heads) is not TMA-readable
    q, k, v = _qkv(Hk=1)
    assert "k strides" in _why(q, k.expand(2, 4, 33, 128), v.expand(2, 4, 33, 128))
    # ... but a size-1 dim's stride does not matter
    q = torch.randn(1, 33, 4, 128, dtype=torch.float16).permute(0, 2, 1, 3)[:, :1]
    assert gluon_fwd.tma_strides(q) is not None and _why(q, *_qkv(B=1, Hq=1, Hk=1)[1:]) is None


def test_device_switches_autotune_and_overrides(sm90, monkeypatch):
    q, k, v = _qkv()
    with fa3_inductor.config.patch(gluon_forward=False):
        assert "gluon_forward is False" in _why(q, k, v)
    with triton_configs.override(fwd=triton_configs.FwdConfig(128, 64, 8, 2)):
        assert "explicit tile config" in _why(q, k, v)
    from fa3_inductor import autotune
    with autotune.enabled_ctx(True):
        assert "autotune" in _why(q, k, v)
    assert "autotune" in _why(q, k, v, spec=CAUSAL.replace(autotune=True))
    monkeypatch.undo()   # the real device check: CPU tensors
    assert "not CUDA" in _why(q, k, v)


def test_config_switch_is_validated():
    assert fa3_inductor.config.gluon_forward is True
    config_check.check_value("gluon_forward", False)
    with pytest.raises(ValueError, match="gluon_forward"):
        config_check.check_value("gluon_forward", "yes")
    with pytest.raises(ValueError, match="read when the op runs"):   # not a per-compile option
        config_check.split_options({"fa3.gluon_forward": False})


def test_template_loads_and_is_keyed_by_source_and_triton(monkeypatch):
    mod = triton_render.load("gluon_fwd")
    assert hasattr(mod, "attn_fwd_kernel") and mod is triton_render.load("gluon_fwd")
    assert str(triton_render.cache_dir()) in mod.__file__
    text = triton_render.render_source("gluon_fwd", None)
    assert "{{" not in text and "coop" not in text.lower()
    assert_keyed_by_source_and_triton(monkeypatch, "gluon_fwd", "gluon")


def test_explain_reports_the_triton_forward(monkeypatch):
    """Where a site's kernel is Triton, explain() says whether the Gluon forward serves it
    (here CPU tensors: the tl kernel, with gluon_supports' reason)."""
    from fa3_inductor import explain
    from fa3_inductor.ops import dispatch

    def attn(q, k, v):
        s = (q @ k.transpose(-2, -1)) * 0.125
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v
    monkeypatch.setattr(dispatch, "choose_forward", lambda q, k, v, bias, spec: triton_impl)
    q = torch.randn(2, 2, 8, 128)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    m = rep.matched[0]
    assert m.kernel == "triton" and m.triton_forward == "tl: inputs are not CUDA tensors", m
    assert "[kernel: triton, forward tl: inputs are not CUDA tensors]" in str(rep)
    monkeypatch.setattr(triton_impl, "gluon_supports", lambda *a, **kw: None)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    assert rep.matched[0].triton_forward == "gluon" and "forward gluon]" in str(rep)


@pytest.mark.parametrize("D,causal,dtype", [(128, True, "fp16"), (256, False, "bf16")])
def test_aot_compile_sm90a(D, causal, dtype):
    """The instantiation the JIT would launch, compiled for sm_90a: warp specialised with
    register budgets, wgmma with the P V operand from registers and two groups in flight, 4-D
    TMA, and no spills or local memory in the assembled code."""
    ck = gluon_fwd.aot_compile(D, causal, dtype)
    ptx = ck.asm["ptx"]
    assert "setmaxnreg" in ptx and "wgmma" in ptx
    _assert_fa3_structure_no_spills(ck)


def _assert_fa3_structure_no_spills(ck):
    """A compiled forward's evidence: setmaxnreg 24 / 240, register-A wgmma with two groups in
    flight, 4-D TMA, no local memory or spills, shared memory and SASS registers within bounds.
    Returns the ptxas report."""
    ptx = ck.asm["ptx"]
    ev = gluon_fwd.ptx_evidence(ptx)
    assert ("dec", "24") in ev["setmaxnreg"] and ("inc", "240") in ev["setmaxnreg"], ev
    assert ev["wgmma_reg_a"] > 0 and ev["two_groups_in_flight"] and ev["tma_4d"], ev
    assert ".local" not in ptx
    assert ck.metadata.shared <= 227 * 1024
    rep = gluon_fwd.ptxas_report(ptx)
    assert rep["ok"], rep["log"][-2000:]
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0 and not rep["stack"], rep["log"]
    assert rep["sass_local"] == 0 and not rep["serialized_wgmma"], rep
    assert rep["sass_max_reg"] is not None and rep["sass_max_reg"] <= 240, rep
    return rep


# ---- the persistent variant (PERSISTENT: one CTA per SM looping over a static tile list) ----

def _work(num_m, m_blk, causal):
    """Key blocks of query tile m_blk of a square top-left head (BLOCK_M = BLOCK_N)."""
    return m_blk + 1 if causal else num_m


@pytest.mark.parametrize("sched", [gluon_fwd.SCHED_HEAD, gluon_fwd.SCHED_PAIRS, gluon_fwd.SCHED_LPT])
@pytest.mark.parametrize("num_m,num_bh,n_progs", [
    (1, 1, 1), (1, 1, 132), (8, 256, 132), (9, 7, 4), (33, 3, 5), (33, 4, 132), (128, 16, 132),
    (2, 3, 1), (5, 1, 3), (7, 2, 14), (64, 8, 133),
])
def test_tile_schedule_runs_every_tile_once(sched, num_m, num_bh, n_progs):
    """tile_schedule (the kernel's _sched_iters / _sched_tile): across the CTAs every
    (m_blk, bh) exactly once, whatever the grid (smaller than the tile count: CTAs loop;
    larger: some CTAs idle)."""
    lists = gluon_fwd.tile_schedule(num_m, num_bh, n_progs, sched)
    assert len(lists) == n_progs
    seen = [t for tiles in lists for t in tiles]
    assert sorted(seen) == [(m, bh) for m in range(num_m) for bh in range(num_bh)]
    if n_progs <= num_m * num_bh and sched != gluon_fwd.SCHED_PAIRS:
        assert all(lists), "a CTA without a tile although there are enough"


@pytest.mark.parametrize("num_m,num_bh,n_progs", [(128, 16, 132), (64, 32, 132), (33, 3, 5), (8, 2, 3)])
def test_tile_schedule_lpt_is_longest_first(num_m, num_bh, n_progs):
    """SCHED_LPT: the i-th tiles of all CTAs (wave i) are never lighter than any tile of wave
    i + 1 (causal work decreases with the query tile's distance from the end), the first wave
    is the n_progs heaviest tiles, heads vary fastest within a query block, and the snake gives
    every CTA a total within one heaviest tile of any other."""
    lists = gluon_fwd.tile_schedule(num_m, num_bh, n_progs, gluon_fwd.SCHED_LPT)
    waves = max(len(t) for t in lists)
    for i in range(waves - 1):
        now = [t[i][0] for t in lists if len(t) > i]
        nxt = [t[i + 1][0] for t in lists if len(t) > i + 1]
        assert min(now) >= max(nxt), (i, now, nxt)
    first = sorted(t[0][0] for t in lists if t)
    heaviest = sorted(m for m in range(num_m) for _ in range(num_bh))[-n_progs:]
    assert first == heaviest
    assert [t[0] for t in lists[:min(n_progs, num_bh)]] == [(num_m - 1, bh) for bh in range(min(n_progs, num_bh))]
    loads = [sum(_work(num_m, m, True) for m, _ in t) for t in lists]
    assert max(loads) - min(loads) <= num_m, loads


@pytest.mark.parametrize("num_m,num_bh,n_progs", [(8, 256, 132), (16, 128, 132), (32, 64, 132), (9, 40, 7)])
def test_tile_schedule_pairs_balance_and_order(num_m, num_bh, n_progs):
    """SCHED_PAIRS: each CTA visit runs a head's heavy tile num_m - 1 - i, then its light tile i
    (one tile for the middle of an odd num_m), units head-major; every CTA's causal work is
    within one unit (num_m + 1 key blocks) of the mean, where longest first with static round
    robin across heads would not be."""
    lists = gluon_fwd.tile_schedule(num_m, num_bh, n_progs, gluon_fwd.SCHED_PAIRS)
    for tiles in lists:
        i = 0
        while i < len(tiles):
            m, bh = tiles[i]
            assert m >= num_m - 1 - m, tiles        # a unit starts with its heavy tile
            if m != num_m - 1 - m:
                assert tiles[i + 1] == (num_m - 1 - m, bh), tiles
                i += 2
            else:
                i += 1
    loads = [sum(_work(num_m, m, True) for m, _ in t) for t in lists]
    mean = sum(loads) / len(loads)
    assert max(loads) - mean <= num_m + 1 and mean - min(loads) <= num_m + 1, loads
    if num_m % 2 == 0:   # the benchmark shapes: head-major round robin is far worse there
        head = [sum(_work(num_m, m, True) for m, _ in t)
                for t in gluon_fwd.tile_schedule(num_m, num_bh, n_progs, gluon_fwd.SCHED_HEAD)]
        assert max(loads) < max(head)


def test_choose_schedule():
    """Non-causal: head-major.  Causal: longest first where each wave still holds several
    tiles of every KV head (or K/V fits L2), else balanced pairs.  Never more CTAs than tiles."""
    S, D = gluon_fwd.SCHED_HEAD, 128
    assert gluon_fwd.choose_schedule(16, 16, 16, 1024, 1024, D, False, 2, 132) == (S, 132)
    assert gluon_fwd.choose_schedule(1, 2, 2, 100, 100, D, True, 2, 132) == (gluon_fwd.SCHED_LPT, 2)
    # the benchmark grid: b*s = 16k, hidden 2048
    want = {1024: "pairs", 2048: "pairs", 4096: "pairs", 8192: "lpt", 16384: "lpt"}
    for seq, name in want.items():
        B, H = 16384 // seq, 2048 // D
        sched, n = gluon_fwd.choose_schedule(B, H, H, seq, seq, D, True, 2, 132)
        assert (gluon_fwd.SCHED_NAMES[sched], n) == (name, 132), seq
    # GQA 8:1 at 1k: 32 KV heads hold 64 MB of K/V but a wave still has 4 tiles of each
    sched, _ = gluon_fwd.choose_schedule(16, 16, 2, 1024, 1024, D, True, 2, 132)
    assert sched == gluon_fwd.SCHED_LPT
    # small K/V (fits L2): longest first whatever the head count
    sched, _ = gluon_fwd.choose_schedule(8, 16, 16, 256, 256, D, True, 2, 132)
    assert sched == gluon_fwd.SCHED_LPT


def test_prepare_persistent_grid_and_default():
    """prepare() builds the persistent launch (grid = CTAs, the schedule) when asked, the tile
    grid otherwise; untold, the measured rule: persistent for causal calls with >= 2048 query
    rows (gluon_fwd.persistent_default).  No launch."""
    assert gluon_fwd.PERSISTENT_CAUSAL_MIN_SQ == 2048
    assert gluon_fwd.persistent_default(True, 2048) and gluon_fwd.persistent_default(True, 16384)
    assert not gluon_fwd.persistent_default(True, 2047) and not gluon_fwd.persistent_default(False, 16384)
    q, k, v = _qkv(B=2, Hq=8, Hk=2, Sq=1000, Sk=1000)
    launch, out, lse = gluon_fwd.prepare(q, k, v, 0.1, True, False)
    assert launch.grid == (8, 16) and not launch.persistent
    q2, k2, v2 = _qkv(B=1, Hq=2, Hk=2, Sq=2048, Sk=2048)
    assert gluon_fwd.prepare(q2, k2, v2, 0.1, True, False, num_ctas=132)[0].persistent
    assert not gluon_fwd.prepare(q2, k2, v2, 0.1, False, False)[0].persistent
    launch, out, lse = gluon_fwd.prepare(q, k, v, 0.1, True, False, persistent=True, num_ctas=7)
    assert launch.grid == (7,) and launch.persistent and launch.sched == gluon_fwd.SCHED_LPT
    assert out.shape == (2, 8, 1000, 128) and lse.shape == (2, 8, 1000)
    launch, _, _ = gluon_fwd.prepare(q, k, v, 0.1, False, False, persistent=True, num_ctas=500)
    assert launch.grid == (8 * 16,) and launch.sched == gluon_fwd.SCHED_HEAD
    launch, _, _ = gluon_fwd.prepare(q, k, v, 0.1, True, False, persistent=True, num_ctas=3,
                                     sched=gluon_fwd.SCHED_PAIRS)
    assert launch.grid == (3,) and launch.sched == gluon_fwd.SCHED_PAIRS


@pytest.mark.parametrize("D,causal,dtype", [(128, False, "fp16"), (128, True, "bf16"),
                                            (256, False, "bf16"), (256, True, "fp16")])
def test_aot_compile_persistent_sm90a(D, causal, dtype):
    """The persistent instantiations for sm_90a: the same FA3 structure (register budgets,
    register-A wgmma, two groups in flight, 4-D TMA) and no spills or local memory, with the
    tile loop's extra state inside the consumers' 240 registers."""
    ck = gluon_fwd.aot_compile(D, causal, dtype, persistent=True, num_sms=132)
    assert ck.persistent_grid == 132
    assert "%nctaid.x" in ck.asm["ptx"]
    rep = _assert_fa3_structure_no_spills(ck)
    assert "SETMAXREG" in rep["sass"] and "HGMMA" in rep["sass"]


class _Bar:
    """An mbarrier: `phase` completed phases; wait(parity) passes once the phase of that parity
    has completed (a fresh barrier passes parity 1); expect() is arrive.expect_tx of one TMA."""

    def __init__(self, count):
        self.count, self.arrived, self.tx, self.phase = count, 0, 0, 0

    def done(self, parity):
        return (self.phase & 1) != parity

    def _flip(self):
        if self.arrived == self.count and self.tx == 0:
            self.arrived, self.phase = 0, self.phase + 1

    def arrive(self):
        self.arrived += 1
        assert self.arrived <= self.count
        self._flip()

    def expect(self):
        self.tx, self.arrived = self.tx + 1, self.arrived + 1

    def landed(self):
        self.tx -= 1
        self._flip()


def _run_protocol(tiles, n_blocks, NS, seed):
    """One CTA of the persistent kernel as three coroutines transliterated from the template
    (_producer_persistent, _consumer_persistent / _attend: the same waits, parities, arrivals
    and running counters), run in a random interleaving with TMA copies landing at random later
    times.  Checks: no deadlock, every wgmma reads the data of its own use (Q of its tile, K/V of
    its block) and nothing lands in a buffer a wgmma is reading, GEMM rounds strictly alternate
    WG0, WG1 across tile boundaries.  Returns the number of GEMM rounds."""
    import random
    rnd = random.Random(seed)
    q_ready, q_empty, turn = [_Bar(1), _Bar(1)], [_Bar(1), _Bar(1)], [_Bar(1), _Bar(1)]
    k_ready, v_ready = [_Bar(1) for _ in range(NS)], [_Bar(1) for _ in range(NS)]
    k_empty, v_empty = [_Bar(2) for _ in range(NS)], [_Bar(2) for _ in range(NS)]
    buf = {("q", i): None for i in range(2)} | {(x, s): None for x in "kv" for s in range(NS)}
    reading = dict.fromkeys(buf, 0)
    landing, rounds = [], []

    def tma(key, val, bar):
        assert reading[key] == 0, f"TMA into {key} while a wgmma reads it"
        bar.expect()
        landing.append((key, val, bar))

    def producer():
        kv = c = 0
        for t in tiles:
            for wg in range(2):
                yield q_empty[wg], (c & 1) ^ 1
                tma(("q", wg), (c, wg), q_ready[wg])
            for j in range(n_blocks(t)):
                g = kv + j
                s, ph = g % NS, ((g // NS) & 1) ^ 1
                yield k_empty[s], ph
                tma(("k", s), g, k_ready[s])
                yield v_empty[s], ph
                tma(("v", s), g, v_ready[s])
            kv, c = kv + n_blocks(t), c + 1

    def gemm(WG, r, reads):      # issue: check the operands, hand over the turn
        for key, want in reads:
            assert buf[key] == want, (WG, key, buf[key], want)
            reading[key] += 1
        rounds.append((WG, r))
        turn[1 - WG].arrive()

    def done(reads):             # wgmma wait: the operands were stable throughout
        for key, want in reads:
            assert buf[key] == want
            reading[key] -= 1

    def consumer(WG):
        flip = 1 - WG
        kv = c = 0
        for t in tiles:
            n = n_blocks(t)
            yield q_ready[WG], c & 1
            r0, q = kv + c, (("q", WG), (c, WG))
            s0 = kv % NS
            yield k_ready[s0], (kv // NS) & 1
            yield turn[WG], (r0 & 1) ^ flip
            gemm(WG, r0, [q, (("k", s0), kv)])
            yield None
            done([q, (("k", s0), kv)])
            k_empty[s0].arrive()
            for j in range(1, n):
                g = kv + j
                sk, sv = g % NS, (g - 1) % NS
                yield k_ready[sk], (g // NS) & 1
                yield v_ready[sv], ((g - 1) // NS) & 1
                yield turn[WG], ((r0 + j) & 1) ^ flip
                gemm(WG, r0 + j, [q, (("k", sk), g), (("v", sv), g - 1)])
                yield None
                done([q, (("k", sk), g)])
                k_empty[sk].arrive()
                yield None
                done([(("v", sv), g - 1)])
                v_empty[sv].arrive()
            q_empty[WG].arrive()       # every S GEMM of the tile waited for
            g = kv + n - 1
            sv = g % NS
            yield v_ready[sv], (g // NS) & 1
            yield turn[WG], ((r0 + n) & 1) ^ flip
            gemm(WG, r0 + n, [(("v", sv), g)])
            yield None
            done([(("v", sv), g)])
            v_empty[sv].arrive()
            kv, c = kv + n, c + 1

    procs = {"producer": producer(), "wg0": consumer(0), "wg1": consumer(1)}
    waits = {}
    for name in list(procs):
        waits[name] = next(procs[name], "end")
    while True:
        live = [p for p, w in waits.items() if w != "end"]
        ready = [p for p in live if waits[p] is None or waits[p][0].done(waits[p][1])]
        if not ready and not landing:
            assert not live, f"deadlock: {live} wait"
            break
        pick = rnd.randrange(len(ready) + (1 if landing else 0))
        if pick == len(ready):
            key, val, bar = landing.pop(rnd.randrange(len(landing)))
            assert reading[key] == 0, f"TMA lands in {key} while a wgmma reads it"
            buf[key] = val
            bar.landed()
        else:
            p = ready[pick]
            waits[p] = next(procs[p], "end")
    assert rounds == [(i % 2, i // 2) for i in range(len(rounds))], rounds[:12]
    return len(rounds)


def test_persistent_protocol_model():
    """The persistent kernel's mbarrier protocol (see _run_protocol) over random tile lists of
    all three orders, causal and not, 2 and 3 stages: deadlock free, data correct, pingpong
    order kept across tiles.  The same model fails when the Q handshake or the running turn
    parity is removed."""
    import random
    rnd = random.Random(0)
    total = 0
    for case in range(60):
        num_m, num_bh, n_progs = rnd.randint(1, 9), rnd.randint(1, 4), rnd.randint(1, 4)
        sched, n_kv, causal = rnd.randint(0, 2), rnd.randint(1, 6), rnd.random() < 0.5
        lists = gluon_fwd.tile_schedule(num_m, num_bh, n_progs, sched)
        for pid, tiles in enumerate(lists):
            total += _run_protocol(tiles, lambda t: min(n_kv, t[0] + 1) if causal else n_kv,
                                   rnd.choice((2, 3)), seed=case * 10 + pid)
    assert total > 1000


def test_forward_routes_with_strides_computed_once(monkeypatch):
    """triton_impl.forward hands an accepted call to gluon_fwd.forward with the TMA strides its
    check computed: tma_strides runs once per q, k, v (it ran twice before: in the check and
    again in prepare)."""
    from fa3_inductor.ops import gluon_fwd
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)
    calls, seen = [], []
    real = gluon_fwd.tma_strides
    monkeypatch.setattr(gluon_fwd, "tma_strides", lambda t: calls.append(1) or real(t))

    def fake(q, k, v, scale, spec, persistent=None, strides=None):
        seen.append(strides)
        return torch.zeros_like(q), torch.zeros(q.shape[:3])
    monkeypatch.setattr(gluon_fwd, "forward", fake)
    q, k, v = _qkv(Hq=8, Hk=2, Sq=40, Sk=70)
    triton_impl.forward(q, k, v, None, None, None, None, 0.1, AttentionSpec(window_right=0, out_dtype="float16"))
    assert len(calls) == 3 and seen == [tuple(real(t) for t in (q, k, v))]
    monkeypatch.setattr(gluon_fwd, "tma_strides", lambda t: None)   # not TMA-readable: the reason, no launch
    assert "not TMA-readable" in triton_impl.gluon_supports(q, k, v, None, None, None, None, AttentionSpec())
