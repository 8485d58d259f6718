"""The Gluon backward (ops/gluon_bwd.py, kernels/triton/gluon_bwd.py.tmpl) on CPU: which calls
triton_impl.gluon_bwd_supports() routes to it and why not the others, the rank argument of the
deterministic dQ turns (pure Python), an emulation of the kernel (float64 blocking against the
reference; the ordered dQ adds under random schedules: deadlock-free, one sum order), the tl
helper kernels through Triton's interpreter, the template's loading, explain()'s report, the
config switch, and an AOT compile of every instantiation for sm_90a (no GPU needed): warp
specialisation (setmaxnreg), wgmma, 4-D TMA, the turns' acquire / release and no spills (one
8-byte exception, test_aot_compile_sm90a).  The
numerics on the H100: tests/gpu/test_gluon_bwd_gpu.py."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fa3_inductor
from fa3_inductor import config_check, reference
from fa3_inductor.codegen import triton_configs, triton_render
from fa3_inductor.ops import gluon_bwd, gluon_fwd, triton_impl
from fa3_inductor.spec import AttentionSpec
from helpers import assert_keyed_by_source_and_triton

CAUSAL = AttentionSpec(window_right=0)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def sm90(monkeypatch):
    """CPU tensors pass the device check (an sm_90 GPU is mocked)."""
    monkeypatch.setattr(triton_impl, "_gluon_device", lambda q, k, v: None)


def _args(B=2, Hq=4, Hk=4, Sq=33, Sk=33, D=128, Dv=None, dtype=torch.float16, transposed=False):
    if transposed:   # [B, S, H, D].transpose(1, 2)
        mk = lambda H, S, d: torch.randn(B, S, H, d, dtype=dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda H, S, d: torch.randn(B, H, S, d, dtype=dtype)  # noqa: E731
    q, k, v = mk(Hq, Sq, D), mk(Hk, Sk, D), mk(Hk, Sk, Dv or D)
    out, dout = mk(Hq, Sq, Dv or D), torch.randn(B, Hq, Sq, Dv or D, dtype=dtype)
    lse = torch.randn(B, Hq, Sq)
    return dout, q, k, v, out, lse


def _why(args, spec=CAUSAL, bias=None, kp=None, slopes=None, seed=None, bias_grad=False, **kw):
    """gluon_bwd_supports for a non-deterministic call (the routed mode) unless the spec says."""
    dout, q, k, v, out, lse = args
    if spec.deterministic_backward is None:
        spec = spec.replace(deterministic_backward=False)
    return triton_impl.gluon_bwd_supports(dout, q, k, v, out, lse, bias, kp, slopes, seed, spec, bias_grad, **kw)


# ---- routing ---------------------------------------------------------------------------------

def test_accepts_the_supported_calls(sm90):
    for D in gluon_bwd.BWD_HEAD_DIMS:
        for dtype in (torch.float16, torch.bfloat16):
            out = "float16" if dtype == torch.float16 else "bfloat16"
            for spec in (AttentionSpec(out_dtype=out), AttentionSpec(window_right=0, out_dtype=out),
                         AttentionSpec(window_right=0, align="bottom_right", out_dtype=out)):
                assert _why(_args(D=D, dtype=dtype), spec=spec, scale=0.1) is None
    assert gluon_bwd.BWD_HEAD_DIMS == (64, 128, 256)
    # GQA 4:1 and 8:1 ("div"), Sq != Sk both ways, length 1, transposed [B, S, H, D] views
    assert _why(_args(Hq=8, Hk=2, Sq=113, Sk=1000)) is None
    assert _why(_args(Hq=8, Hk=1, Sq=1000, Sk=113)) is None
    assert _why(_args(Sq=1, Sk=1)) is None
    args = _args(Sq=77, Sk=77, transposed=True)
    assert not args[1].is_contiguous() and _why(args) is None
    # the deterministic default (and a site compiled with it): the Gluon turns only where they
    # measured faster (triton_impl.DETERMINISTIC_GLUON_MIN_SK: fewest keys per head dim and
    # causality); elsewhere the tl kernels, with why.  Every head dim has the turns.
    assert gluon_bwd.DETERMINISTIC_HEAD_DIMS == (64, 128, 256)
    assert triton_impl.DETERMINISTIC_GLUON_MIN_SK == {(64, False): 4096, (64, True): 4096, (128, False): 4096,
                                                      (128, True): 1024, (256, False): 4096, (256, True): 4096}
    FULL = AttentionSpec()
    for D in gluon_bwd.BWD_HEAD_DIMS:
        long_keys = _args(D=D, B=1, Hq=2, Hk=2, Sq=64, Sk=16384)
        for det_spec in (FULL.replace(deterministic_backward=True), FULL):
            why = triton_impl.gluon_bwd_supports(*long_keys, None, None, None, None, det_spec, False)
            assert why is None, why
        with fa3_inductor.config.patch(deterministic_backward=False):
            dout, q, k, v, out, lse = _args(D=D)
            assert triton_impl.gluon_bwd_supports(dout, q, k, v, out, lse, None, None, None, None, CAUSAL, False) is None
    for (D, causal), least in triton_impl.DETERMINISTIC_GLUON_MIN_SK.items():
        spec = CAUSAL if causal else FULL
        at = _args(D=D, B=1, Hq=2, Hk=2, Sq=64, Sk=least)
        assert triton_impl.gluon_bwd_supports(*at, None, None, None, None, spec, False) is None, (D, causal)
        below = _args(D=D, B=1, Hq=2, Hk=2, Sq=64, Sk=least - 1)
        why = triton_impl.gluon_bwd_supports(*below, None, None, None, None, spec, False)
        assert f"{least - 1} keys < {least} ({'causal' if causal else 'no mask'}, d{D})" in why, why


@pytest.mark.parametrize("change,needle", [
    (dict(bias=torch.zeros(2, 4, 33, 33, dtype=torch.float16), spec=AttentionSpec(mask_kind="additive")),
     "additive mask/bias"),
    (dict(bias=torch.ones(2, 4, 33, 33, dtype=torch.bool), spec=AttentionSpec(mask_kind="bool")), "bool mask"),
    (dict(bias_grad=True), "bias gradient"),
    (dict(kp=torch.ones(2, 33, dtype=torch.bool), spec=AttentionSpec(key_padding=True)), "key padding"),
    (dict(slopes=torch.ones(4), spec=AttentionSpec(alibi="linear")), "ALiBi"),
    (dict(spec=AttentionSpec(softcap=30.0)), "softcap"),
    (dict(seed=torch.zeros(2, dtype=torch.int64), spec=AttentionSpec(dropout_p=0.1)), "dropout"),
    (dict(spec=AttentionSpec(window_left=16, window_right=0)), "window"),
    (dict(spec=AttentionSpec(window_right=4)), "window"),
    (dict(config=triton_configs.BwdConfig(64, 64, 64, 64, 4, 1)), "explicit tile config"),
])
def test_rejections_name_the_reason(sm90, change, needle):
    why = _why(_args(), **change)
    assert why is not None and needle in why, why


@pytest.mark.parametrize("shapes,needle", [
    (dict(D=96), "head dims"), (dict(D=32), "head dims"), (dict(D=128, Dv=256), "head dims"),
    (dict(D=128, Dv=64), "head dims"), (dict(dtype=torch.float32), "dtype"),
    (dict(Hq=6, Hk=4), "multiple of kv heads"), (dict(Sq=0), "empty"), (dict(Sk=0), "empty"),
])
def test_rejects_shapes_and_dtypes(sm90, shapes, needle):
    why = _why(_args(**shapes))
    assert why is not None and needle in why, why


def test_rejects_out_dout_lse_mismatches(sm90):
    dout, q, k, v, out, lse = _args()
    assert "out/dout dtype" in _why((dout.float(), q, k, v, out.float(), lse))
    assert "out/dout dtype" in _why((dout, q, k, v, out.bfloat16(), lse))
    assert "lse dtype" in _why((dout, q, k, v, out, lse.double()))
    assert "shapes" in _why((dout[:, :, :5], q, k, v, out, lse))
    assert "shapes" in _why((dout, q, k, v, out, lse[:, :2]))


def test_rejects_mod_gqa_non_tma_layouts_and_big_grids(sm90):
    args = _args(Hq=8, Hk=2)
    assert "GQA mapping 'mod'" in _why(args, spec=AttentionSpec(gqa_mapping="mod"))
    assert _why(_args(), spec=AttentionSpec(gqa_mapping="mod")) is None   # no GQA: mapping moot
    dout, q, k, v, out, lse = _args()
    # a row stride of 132 elements (264 bytes) is no 16-byte multiple
    bad = torch.randn(2, 4, 33, 132, dtype=torch.float16)[..., :128]
    for i, name in ((0, "dout"), (1, "q"), (2, "k"), (3, "v")):
        args = [dout, q, k, v, out, lse]
        args[i] = bad
        assert f"{name} strides" in _why(tuple(args)), name
    # base not 16-byte aligned
    kk = torch.randn(2 * 4 * 33 * 128 + 1, dtype=torch.float16)[1:].view(2, 4, 33, 128)
    assert "k strides" in _why((dout, q, kk, v, out, lse))
    # an expand()ed K/V (stride 0 over heads) is not TMA-readable
    dout, q, k, v, out, lse = _args(Hk=1)
    assert "k strides" in _why((dout, q, k.expand(2, 4, 33, 128), v.expand(2, 4, 33, 128), out, lse))
    # out only needs a contiguous head dim (the preprocess reads it through its strides)
    assert _why((dout, q, k, v, torch.randn(2, 4, 33, 256, dtype=torch.float16)[..., ::2], lse)) is not None
    odd = torch.randn(2, 4, 33, 136, dtype=torch.float16)[..., :128]   # 272-byte rows: not TMA, fine for out
    assert _why((dout, q, k, v, odd, lse)) is None
    # grid axis 1 of the preprocess / dQ kernels is B * Hq
    assert "65535" in _why(_args(B=65536, Hq=1, Hk=1, Sq=1, Sk=1, D=64))


def test_device_switches_autotune_and_overrides(sm90, monkeypatch):
    args = _args()
    with fa3_inductor.config.patch(gluon_backward=False):
        assert "gluon_backward is False" in _why(args)
    with fa3_inductor.config.patch(gluon_forward=False):   # the forward's switch is separate
        assert _why(args) is None
    with triton_configs.override(bwd=triton_configs.default_bwd(128, 128, True)):
        assert "explicit tile config" in _why(args)
    with triton_configs.override(fwd=triton_configs.FwdConfig(128, 64, 8, 2)):   # a forward override
        assert _why(args) is None
    from fa3_inductor import autotune
    with autotune.enabled_ctx(True):
        assert "autotune" in _why(args)
    assert "autotune" in _why(args, spec=CAUSAL.replace(autotune=True))
    monkeypatch.undo()   # the real device check: CPU tensors
    assert "not CUDA" in _why(args)


def test_backward_routes_with_strides_computed_once(sm90, monkeypatch):
    """triton_impl.backward hands an accepted call to gluon_bwd.backward with the TMA strides the
    check computed (tma_strides once per tensor), the site's determinism and the scale."""
    calls, seen = [], []
    real = gluon_bwd.tma_strides
    monkeypatch.setattr(gluon_bwd, "tma_strides", lambda t: calls.append(1) or real(t))

    def fake(dout, q, k, v, out, lse, scale, spec, deterministic, *, strides=None):
        seen.append((scale, deterministic, strides))
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    monkeypatch.setattr(gluon_bwd, "backward", fake)
    monkeypatch.setattr(triton_impl, "DETERMINISTIC_GLUON_MIN_SK",     # short keys take the turns too
                        dict.fromkeys(triton_impl.DETERMINISTIC_GLUON_MIN_SK, 0))
    dout, q, k, v, out, lse = _args(Hq=8, Hk=2, Sq=40, Sk=70, transposed=True)
    for det in (None, False, True):
        calls.clear()
        dq, dk, dv, dbias = triton_impl.backward(dout, q, k, v, out, lse, None, None, None, None, 0.125,
                                                 AttentionSpec(deterministic_backward=det), False)
        assert len(calls) == 4, "tma_strides must run once per q, k, v, dout"
        assert dbias.numel() == 0 and dq.shape == q.shape
    assert [s[:2] for s in seen] == [(0.125, True), (0.125, False), (0.125, True)]
    assert seen[0][2] == tuple(real(t) for t in (q, k, v, dout))
    # deterministic at d256 (the dQ writer's half tile): routed like the others
    d256 = _args(D=256, Hq=8, Hk=2, Sq=40, Sk=70, transposed=True)
    assert triton_impl.gluon_bwd_supports(*d256, None, None, None, None, AttentionSpec(), False) is None


def test_config_switch_is_validated():
    assert fa3_inductor.config.gluon_backward is True
    config_check.check_value("gluon_backward", False)
    with pytest.raises(ValueError, match="gluon_backward"):
        config_check.check_value("gluon_backward", "yes")
    with pytest.raises(ValueError, match="gluon_backward.*read when the op runs"):   # not a compile option
        config_check.split_options({"fa3.gluon_backward": False})
    with fa3_inductor.config.patch(gluon_backward=False):
        config_check.validate()
        assert fa3_inductor.config.gluon_backward is False
    assert fa3_inductor.config.gluon_backward is True


# ---- the dQ turns (deterministic) -----------------------------------------------------------

@pytest.mark.parametrize("D", gluon_bwd.DETERMINISTIC_HEAD_DIMS)
def test_turn_ranks_are_prefixes(D):
    """The rank argument of the deterministic dQ: for every query block m the key blocks that
    add into it (m_start(n) <= m) are exactly 0 .. k(m), because m_start is non-decreasing in
    n (non-causal, causal top-left and bottom-right, Sq <, =, > Sk)."""
    BM, BN = gluon_bwd.CONFIGS[D][:2]
    for Sq, Sk in ((1, 1), (17, 1000), (1000, 17), (300, 300), (4097, 4096), (64, 128), (130, 70)):
        num_m, n_kv = -(-Sq // BM), -(-Sk // BN)
        for causal, off in ((False, 0), (True, 0), (True, Sk - Sq)):
            starts = [gluon_bwd.query_blocks(n * BN, num_m, off, BM, causal)[0] for n in range(n_kv)]
            assert starts == sorted(starts), (Sq, Sk, causal, off)
            for m in range(num_m):
                adders = [n for n in range(n_kv) if starts[n] <= m]
                assert adders == list(range(len(adders))), (Sq, Sk, causal, off, m)


def test_deterministic_mode_at_every_head_dim():
    """Every head dim has a dQ writer partition (d256: a half tile in the shared memory of
    its second dO stage), so every one has the deterministic mode; outside
    DETERMINISTIC_HEAD_DIMS prepare / backward / aot_compile would raise ValueError before
    touching any device (checked with the set emptied)."""
    assert gluon_bwd.DETERMINISTIC_HEAD_DIMS == gluon_bwd.BWD_HEAD_DIMS == (64, 128, 256)
    assert gluon_bwd.DO_STAGES == {64: 2, 128: 2, 256: 1}
    dout, q, k, v, out, lse = _args(D=256)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gluon_bwd, "DETERMINISTIC_HEAD_DIMS", (64, 128))
        with pytest.raises(ValueError, match="no deterministic mode at head dim 256"):
            gluon_bwd.prepare(dout, q, k, v, out, lse, 0.1, True, False, True)
        with pytest.raises(ValueError, match="no deterministic mode at head dim 256"):
            gluon_bwd.backward(dout, q, k, v, out, lse, 0.1, CAUSAL, True)
        with pytest.raises(ValueError, match="no deterministic mode at head dim 256"):
            gluon_bwd.aot_compile(256, True, "fp16", True)


def test_query_blocks_start_at_the_first_query_that_sees_the_key():
    BM = 64
    for Sq, Sk, br in ((300, 300, False), (100, 400, False), (400, 100, False), (100, 400, True),
                       (400, 100, True), (1, 1000, True), (1000, 1, True), (17, 1, False)):
        off = Sk - Sq if br else 0
        num_m = -(-Sq // BM)
        for n0 in range(0, Sk, 64):
            m_start, n_m = gluon_bwd.query_blocks(n0, num_m, off, BM, True)
            assert m_start + n_m == num_m and 0 <= m_start <= num_m
            sees = [i for i in range(Sq) if n0 <= i + off]     # queries that see key n0
            if sees:
                assert m_start == sees[0] // BM
            else:
                assert n_m == 0
        assert gluon_bwd.query_blocks(128, num_m, off, BM, False) == (0, num_m)


# ---- the kernel's blocking, emulated ----------------------------------------------------------

def _emulate(dout, q, k, v, out, lse, scale, causal, bottom_right, deterministic, slots=3, seed=0,
             acc=torch.float64, lockstep=False, chains=1):
    """The kernel step by step, the math in float64: the preprocess (LSE -inf -> +inf, padded
    rows), TMA-like zero-filled tiles per head, one CTA per (key block n, b, kvh), the kernel's
    visit order (query blocks from num_m - 1 DOWN to the causal start block, outer; the group's
    query heads, inner: every CTA of a kv head adds (hq, m) at the same step, checked), the
    kernel's masks, dK / dV per CTA.  The dQ tiles are added into one `acc`-typed buffer under a simulated schedule: CTAs
    dispatched in the grid's linear order (key block fastest) onto `slots` SMs, a random
    resident CTA (rng `seed`) advancing by one tile add at a time; deterministic: a tile of
    (b, hq, m) may be added only when turn[b, hq, m] == n, and adding it passes the turn (the
    kernel counts 32 * DQW_WARPS thread releases per tile; one here).  A schedule where every
    resident CTA waits is a deadlock (AssertionError).  lockstep: instead of one random add at
    a time, every resident CTA that may add does so in each round (all SMs at one speed), and
    the rounds each CTA spent waiting are counted.  chains: key block n adds into buffer n %
    chains with rank n // chains there (turn[chain, b, hq, m] == rank), and dq sums the buffers
    in chain order (ops/gluon_bwd.deterministic_chains).  Returns dq, dk, dv, the ranks of the
    adds in order per (chain, b, hq, m), the number of CTAs and [(n, rounds waited)] per CTA
    (lockstep)."""
    f = torch.float64
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    BM, BN, _, _ = gluon_bwd.CONFIGS[D]
    num_m, n_kv = -(-Sq // BM), -(-Sk // BN)
    sq_pad = num_m * BM
    group, off = Hq // Hk, (Sk - Sq) if (causal and bottom_right) else 0
    live = lse > float("-inf")
    lse2 = torch.full((B, Hq, sq_pad), float("inf"), dtype=f)
    delta = torch.zeros(B, Hq, sq_pad, dtype=f)
    lse2[..., :Sq] = torch.where(live, lse.to(f) * math.log2(math.e), torch.full_like(lse2[..., :Sq], float("inf")))
    delta[..., :Sq] = torch.where(live, (out.to(f) * dout.to(f)).sum(-1), torch.zeros_like(delta[..., :Sq]))

    def tile(t, b, h, r0, n):
        x = torch.zeros(n, D, dtype=f)
        rows = t[b, h, r0:r0 + n].to(f)
        x[:rows.shape[0]] = rows
        return x
    dk = torch.full(k.shape, float("nan"), dtype=f)
    dv = torch.full(v.shape, float("nan"), dtype=f)
    ctas = []                                # grid order: (n, b * Hk + kvh), n fastest
    for bkv in range(B * Hk):
        b, kvh = divmod(bkv, Hk)
        for nb in range(n_kv):
            n0 = nb * BN
            m_start, n_m = gluon_bwd.query_blocks(n0, num_m, off, BM, causal)
            K, V = tile(k, b, kvh, n0, BN), tile(v, b, kvh, n0, BN)
            keys = (n0 + torch.arange(BN)).view(-1, 1)
            dK = torch.zeros(BN, D, dtype=f)
            dV = torch.zeros(BN, D, dtype=f)
            adds = []                        # the writer's tiles, in step order
            for mb in range(num_m - 1, m_start - 1, -1):          # descending (outer)
                for h in range(kvh * group, kvh * group + group):  # the group's heads (inner)
                    # the same step for (h, mb) in every CTA of the kv head, whatever m_start
                    assert len(adds) == (num_m - 1 - mb) * group + (h - kvh * group)
                    m0 = mb * BM
                    Q, dO = tile(q, b, h, m0, BM), tile(dout, b, h, m0, BM)
                    s2 = K @ Q.T * (scale * math.log2(math.e)) - lse2[b, h, m0:m0 + BM]
                    if n0 + BN > Sk or (causal and m0 + off < n0 + BN):
                        if causal:
                            last = torch.clamp(m0 + off + torch.arange(BM), max=Sk - 1).view(1, -1)
                            s2 = torch.where(keys <= last, s2, torch.full((), float("-inf"), dtype=f))
                        else:
                            s2 = torch.where(keys < Sk, s2, torch.full((), float("-inf"), dtype=f))
                    pt = torch.exp2(s2)
                    dV += pt @ dO
                    ds = pt * (V @ dO.T - delta[b, h, m0:m0 + BM])
                    dK += ds @ Q
                    adds.append((b, h, mb, (ds.T @ K).to(acc)))   # whole tile: rows >= Sq are 0
            n = min(BN, Sk - n0)
            dk[b, kvh, n0:n0 + n] = dK[:n] * scale
            dv[b, kvh, n0:n0 + n] = dV[:n]
            ctas.append((nb, adds))
    buf = torch.zeros(chains, B, Hq, sq_pad, D, dtype=acc)
    turn = torch.zeros(chains, B, Hq, num_m, dtype=torch.int64)
    order = {}
    rng = torch.Generator().manual_seed(seed)
    resident, nxt = [], 0                    # [cta index, next add]
    waited = [0] * len(ctas)
    while resident or nxt < len(ctas):
        while len(resident) < slots and nxt < len(ctas):
            resident.append([nxt, 0])
            nxt += 1
        runnable = []
        for r in resident:
            nb, adds = ctas[r[0]]
            if r[1] == len(adds):
                runnable.append(r)           # finishing frees the slot
                continue
            b, h, mb, _ = adds[r[1]]
            if not deterministic or turn[nb % chains, b, h, mb] == nb // chains:
                runnable.append(r)
        assert runnable, f"deadlock: resident CTAs {[(ctas[r[0]][0], r[1]) for r in resident]} all wait"
        if lockstep:                         # turns read at the start of the round
            for r in resident:
                waited[r[0]] += all(r is not x for x in runnable)
        else:
            runnable = [runnable[int(torch.randint(len(runnable), (1,), generator=rng))]]
        for r in runnable:
            nb, adds = ctas[r[0]]
            if r[1] == len(adds):
                resident.remove(r)
                continue
            b, h, mb, x = adds[r[1]]
            c = nb % chains
            buf[c, b, h, mb * BM:(mb + 1) * BM] += x
            turn[c, b, h, mb] += 1
            order.setdefault((c, b, h, mb), []).append(nb // chains)
            r[1] += 1
    total = buf[0]
    for c in range(1, chains):               # the finish kernel's fixed order
        total = total + buf[c]
    dq = total[:, :, :Sq].to(f) * scale
    return dq, dk, dv, order, len(ctas), [(c[0], w) for c, w in zip(ctas, waited)]


def _problem64(D, shape, align):
    B, Hq, Hk, Sq, Sk = shape
    causal = align != "none"
    spec = AttentionSpec(window_right=0 if causal else None, align="bottom_right" if align == "bottom_right" else "top_left",
                         out_dtype="float64")
    torch.manual_seed(Sq * 3 + Sk)
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    k = torch.randn(B, Hk, Sk, D, dtype=torch.float64)
    v = torch.randn(B, Hk, Sk, D, dtype=torch.float64)
    dout = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    scale = D ** -0.5
    out, lse = reference.forward(q, k, v, None, None, None, None, scale, spec)
    want = reference.backward(dout, q, k, v, out, lse, None, None, None, None, scale, spec, False)[:3]
    return (dout, q, k, v, out, lse, scale, causal, align == "bottom_right"), want


@pytest.mark.parametrize("D,shape,align,det,slots", [
    (64, (2, 4, 4, 70, 70), "none", True, 3),
    (64, (1, 8, 2, 113, 300), "top_left", True, 2),       # GQA 4:1, Sq < Sk
    (64, (1, 8, 2, 300, 113), "top_left", False, 132),   # Sq > Sk: keys < Sk masked in later rows
    (64, (2, 4, 1, 400, 300), "bottom_right", True, 1),  # dead rows (no key), GQA 4:1, one SM
    (64, (1, 8, 1, 17, 1), "bottom_right", True, 132),   # one key, 8:1
    (64, (1, 2, 2, 1, 300), "bottom_right", False, 132), # one query sees every key
    (64, (1, 2, 2, 1, 300), "top_left", True, 2),        # key blocks no query sees: dk = dv = 0
    (128, (1, 4, 2, 300, 520), "bottom_right", True, 2),  # 5 key blocks per head, ranks 0..4
    (256, (1, 4, 2, 100, 300), "top_left", True, 6),     # d256 deterministic too (5 key blocks)
    (256, (1, 2, 1, 130, 70), "bottom_right", False, 132),
])
def test_emulated_blocking_matches_the_reference(D, shape, align, det, slots):
    args, want = _problem64(D, shape, align)
    B, Hq, Hk, Sq, Sk = shape
    dead = torch.isneginf(args[5])
    assert dead.any() == (align == "bottom_right" and Sq > Sk)
    got = _emulate(*args, det, slots=slots)
    assert got[4] == -(-Sk // gluon_bwd.CONFIGS[D][1]) * B * Hk, "one CTA per key block"
    if det:
        for key, ranks in got[3].items():
            assert ranks == list(range(len(ranks))), ("adds out of rank order", key, ranks)
    for name, g, w in zip(("dq", "dk", "dv"), got[:3], want):
        assert not torch.isnan(g).any(), f"{name}: NaN / unwritten rows"
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=name)
    assert (got[0][dead] == 0).all()


@pytest.mark.parametrize("D,shape,align", [
    (128, (1, 4, 2, 300, 700), "none"),
    (64, (2, 4, 2, 500, 500), "top_left"),
    (64, (1, 4, 4, 260, 700), "bottom_right"),
])
def test_emulated_turns_give_one_sum_order(D, shape, align):
    """The ordered adds with fp32 accumulation (where the order shows in the bits): random
    schedules on 1, 2 or many SMs, all deadlock-free, give bit-identical dq, equal to adding
    the key blocks' tiles in the order n = 0, 1, ...; the unordered (atomic) mode's schedules
    add in other orders, as the rank check shows."""
    args, _ = _problem64(D, shape, align)
    runs = [_emulate(*args, True, slots=slots, seed=seed, acc=torch.float32)
            for slots, seed in ((1, 0), (2, 1), (3, 2), (64, 3), (64, 4))]
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0])
        assert r[3] == runs[0][3]
    assert all(ranks == list(range(len(ranks))) for ranks in runs[0][3].values())
    assert max(len(ranks) for ranks in runs[0][3].values()) >= 3
    free = [_emulate(*args, False, slots=64, seed=seed, acc=torch.float32)[3] for seed in range(3)]
    assert any(ranks != sorted(ranks) for f in free for ranks in f.values()), "the atomic schedules never reordered"


@pytest.mark.parametrize("D,shape,align", [
    (64, (1, 1, 1, 1000, 1000), "top_left"),       # 8 key blocks, 16 query blocks
    (64, (1, 4, 2, 700, 1000), "bottom_right"),     # GQA 2:1: the steps of every head aligned too
    (128, (1, 3, 1, 600, 450), "top_left"),         # GQA 3:1, Sq > Sk
    (64, (1, 2, 1, 500, 500), "none"),
])
def test_descending_visit_waits_only_for_the_rank_chain(D, shape, align):
    """All CTAs resident, one tile add per CTA and round: with the descending visit order every
    CTA of a kv head reaches each (hq, m) at the same step, so key block n waits only while the
    chain of ranks fills (n rounds, at the start), never for the lower ranks to reach its
    diagonal block (the ascending order made causal CTA n wait ~m_start(n) * group rounds
    more).  The sums still come in rank order and match the reference."""
    args, want = _problem64(D, shape, align)
    got = _emulate(*args, True, slots=1 << 20, lockstep=True)
    assert max(nb for nb, _ in got[5]) >= 3
    for nb, waited in got[5]:
        assert waited <= nb, ("waited past the rank chain", nb, waited)
    assert all(ranks == list(range(len(ranks))) for ranks in got[3].values())
    for g, w in zip(got[:3], want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


# ---- the tl helper kernels, interpreted ------------------------------------------------------

_INTERP = r'''
import math, sys
sys.path.insert(0, sys.argv[1])
import triton_interp  # noqa: F401  (TRITON_INTERPRET=1 before triton)
import torch
from fa3_inductor.ops import gluon_bwd
mod = gluon_bwd.kernel_module()
B, H, S, D, sq_pad = 2, 3, 70, 64, 128
o = torch.randn(B, S, H, D).transpose(1, 2)          # out in its own strides
do = torch.randn(B, H, S, D)
lse = torch.randn(B, H, S)
lse[0, 1, 5] = float("-inf")
delta = torch.full((B * H * sq_pad,), float("nan"))
lse2 = delta.clone()
mod.attn_bwd_preprocess[(sq_pad // 32, B * H)](o, do, lse, delta, lse2, S, sq_pad, o.stride(0), o.stride(1),
    o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, HEAD_DIM=D, BLOCK=32)
d, l2 = delta.view(B, H, sq_pad), lse2.view(B, H, sq_pad)
live = lse > float("-inf")
assert torch.allclose(d[:, :, :S][live], (o * do).sum(-1)[live], atol=1e-5)
assert torch.allclose(l2[:, :, :S][live], lse[live] * math.log2(math.e))
assert d[0, 1, 5] == 0 and l2[0, 1, 5] == float("inf")
assert (d[:, :, S:] == 0).all() and torch.isposinf(l2[:, :, S:]).all()
acc = torch.randn(B, H, sq_pad, D)
dq = torch.empty(B, H, S, D, dtype=torch.float16)
mod.attn_bwd_dq_finish[(math.ceil(S / 32), B * H)](acc, acc, dq, S, sq_pad, 0.5, acc.numel(), 1, B * H,
                                                  HEAD_DIM=D, BLOCK=32, TILE_M=64, DETERMINISTIC=False)
assert torch.equal(dq, (acc * 0.5)[:, :, :S].half())
# deterministic, three chains summed in order; a chain's 64-row tile counts only where its turn
# moved (the buffers are not zeroed: NaN where nobody wrote)
acc3 = torch.randn(3, B, H, sq_pad, D)
turns = torch.ones(3, B * H, sq_pad // 64, dtype=torch.int32)
turns[1, 4, 1] = 0
acc3[1].view(B * H, sq_pad, D)[4, 64:] = float("nan")
mod.attn_bwd_dq_finish[(math.ceil(S / 32), B * H)](acc3, turns, dq, S, sq_pad, 0.5, acc3[0].numel(), 3, B * H,
                                                  HEAD_DIM=D, BLOCK=32, TILE_M=64, DETERMINISTIC=True)
acc3[1].view(B * H, sq_pad, D)[4, 64:] = 0
assert torch.equal(dq, (((acc3[0] + acc3[1]) + acc3[2]) * 0.5)[:, :, :S].half())
print("OK")
'''


def test_helper_kernels_interpreted(tmp_path):
    """The preprocess (D, LSE*log2e with the -inf -> +inf mapping and padded rows, out in its
    own strides) and the dQ finish (the buffer's rows < Sq scaled and cast) through Triton's
    interpreter, in a child process (TRITON_INTERPRET is process-wide)."""
    script = tmp_path / "interp_gluon_bwd.py"
    script.write_text(_INTERP)
    root = os.path.dirname(HERE)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FA3_INDUCTOR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script), HERE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]


# ---- template, explain ------------------------------------------------------------------------

def test_template_loads_and_is_keyed_by_source_and_triton(monkeypatch):
    mod = triton_render.load("gluon_bwd")
    for name in ("attn_bwd_kernel", "attn_bwd_preprocess", "attn_bwd_dq_finish"):
        assert hasattr(mod, name), name
    assert mod is triton_render.load("gluon_bwd") and mod is not triton_render.load("gluon_fwd")
    assert str(triton_render.cache_dir()) in mod.__file__
    text = triton_render.render_source("gluon_bwd", None)
    assert "{{" not in text and "barrier protocol" in text and "Deterministic dQ" in text
    assert triton_render._key("gluon_bwd", None, False) != triton_render._key("gluon_fwd", None, False)
    assert_keyed_by_source_and_triton(monkeypatch, "gluon_bwd", "gluon_bwd")


def test_explain_reports_the_triton_backward(monkeypatch):
    """explain() prints the backward next to the forward: CPU tensors give the tl backward with
    gluon_bwd_supports' reason; an accepted call prints `[backward gluon]`."""
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
    assert m.triton_backward == "tl: inputs are not CUDA tensors", m
    assert "[kernel: triton, forward tl: inputs are not CUDA tensors] [backward tl: inputs are not CUDA tensors]" \
        in str(rep)
    seen = []
    monkeypatch.setattr(triton_impl, "gluon_bwd_supports",
                        lambda dout, q, k, v, out, lse, *a, **kw: seen.append((dout.shape, lse.shape)) or None)
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    assert rep.matched[0].triton_backward == "gluon" and "[backward gluon]" in str(rep)
    assert seen == [((2, 2, 8, 128), (2, 2, 8))]
    # the CUDA template's backward is triton_impl.backward too
    monkeypatch.setattr(dispatch, "choose_forward", lambda q, k, v, bias, spec: __import__(
        "fa3_inductor.ops.cuda_impl", fromlist=["x"]))
    with fa3_inductor.config.patch(force_rewrite=True):
        rep = explain(attn, q, q, q)
    assert rep.matched[0].kernel == "cuda" and "[kernel: cuda] [backward gluon]" in str(rep)


# ---- AOT compile for sm_90a -------------------------------------------------------------------

_AOT = [(D, causal, dtype, det) for D in gluon_bwd.BWD_HEAD_DIMS for causal in (False, True)
        for dtype in ("fp16", "bf16") for det in (True, False) if D in gluon_bwd.DETERMINISTIC_HEAD_DIMS or not det]


@pytest.mark.parametrize("D,causal,dtype,det", _AOT, ids=lambda x: str(x))
def test_aot_compile_sm90a(D, causal, dtype, det):
    """The instantiation the JIT would launch, compiled for sm_90a: warp specialised with register
    budgets (producer 24, consumers 240), wgmma (P^T / dS^T from registers at d64 / d128), 4-D
    TMA, relaxed dQ reductions, and no spills or local memory in the assembled code (but the 8
    bytes of d128 causal deterministic, below).
    Deterministic: the turn wait (gpu-scope acquire loads with a nanosleep backoff) and the
    turn pass (gpu-scope release add), once each in every writer (d64 / d128: two writer
    partitions; d256: one); none in the atomic mode."""
    ck = gluon_bwd.aot_compile(D, causal, dtype, det)
    ptx = ck.asm["ptx"]
    n_acq = ptx.count("ld.acquire.gpu.global.b32")
    n_rel = ptx.count("red.release.gpu.global.add.s32")
    if det:
        writers = 2 if gluon_bwd.CONFIGS[D][3] == 1 else 1
        assert n_acq == writers and n_rel == writers and "nanosleep.u32" in ptx, (n_acq, n_rel)
    else:
        assert n_acq == 0 and n_rel == 0 and "nanosleep" not in ptx, (n_acq, n_rel)
    ev = gluon_fwd.ptx_evidence(ptx)
    assert ("dec", "24") in ev["setmaxnreg"] and ("inc", "240") in ev["setmaxnreg"], ev
    assert ev["wgmma"] > 0 and ev["tma_4d"], ev
    if gluon_bwd.CONFIGS[D][3] == 1:
        assert ev["wgmma_reg_a"] > 0, ev
    assert "atom.global.gpu.relaxed.add" in ptx
    assert ".local" not in ptx
    assert ck.metadata.shared <= 227 * 1024
    rep = gluon_fwd.ptxas_report(ptx)
    assert rep["ok"], rep["log"][-2000:]
    # d128 causal deterministic (the consumers at 238 of 240 registers and at the edge of their
    # uniform registers): ptxas parks two loop scalars in 8 bytes of local memory, stored before
    # the step loop and reloaded twice a step (L1 hits, off the wgmma chains; that mode measured
    # 0.77-0.92x cuDNN in session 11's device run 2, its best).  Every other instantiation: none.
    spill = 8 if (D, causal, det) == (128, True, True) else 0
    assert rep["spill_stores"] <= spill and rep["spill_loads"] <= spill and rep["stack"] <= spill, rep["log"]
    assert rep["sass_local"] <= (4 if spill else 0) and not rep["serialized_wgmma"], rep
    assert rep["sass_max_reg"] is not None and rep["sass_max_reg"] <= 240, rep


@pytest.mark.parametrize("D", gluon_bwd.BWD_HEAD_DIMS)
def test_aot_dq_writer_partition(D):
    """Every head dim hands dQ to writer partitions through fp32 tiles in shared memory: the
    only dQ reductions are theirs, 128-bit (REDG.E.ADD.F32x4, no v2 ones left in the
    consumers), the CTA keeps 12 warps (the workers share one padded warpgroup) with the
    workers at 24 registers and the consumers at 240.  d64 / d128: two 1-warp writers on two
    whole tiles (deterministic: the first rank of a chain stores, st.global.v4).  d256: one dO
    stage and a [64, 128] half tile (shared memory: K, V, 2 x Q, 1 x dO, dS^T, P^T + 32 KB),
    filled twice per step for one 2-warp writer (its dq_empty arrive is a 64-thread named
    barrier): the consumers issue dV, dQ_lo, dQ_hi, dK and wait for them one by one
    (wgmma.wait_group 3, 2, 1, 0)."""
    import re
    BM, BN, NS, WN = gluon_bwd.CONFIGS[D]
    ck = gluon_bwd.aot_compile(D, True, "fp16", D in gluon_bwd.DETERMINISTIC_HEAD_DIMS)
    ptx = ck.asm["ptx"]
    ev = gluon_fwd.ptx_evidence(ptx)
    assert re.search(r"\.reqntid 384\b", ptx), "12 warps: consumers 8 + workers padded to 4"
    assert ("dec", "24") in ev["setmaxnreg"] and ("inc", "240") in ev["setmaxnreg"], ev
    v4 = len(re.findall(r"atom\.global\.gpu\.relaxed\.add\.v4\.f32", ptx))
    v2 = len(re.findall(r"atom\.global\.gpu\.relaxed\.add\.v2\.f32", ptx))
    writer_bar = re.search(r"bar\.sync\s+\d+,\s*64;", ptx)
    sass = gluon_fwd.ptxas_report(ptx)["sass"]
    assert v4 > 0 and v2 == 0, (v4, v2)
    assert "REDG.E.ADD.F32x4" in sass and "F32x2" not in sass
    # K, V, Q and dO stages, dS^T (and P^T in smem mode), 16-bit, + the fp32 dQ tiles (d64 /
    # d128: two whole ones; d256: one half)
    tiles = 2 if WN == 1 else 1
    need = (2 * BN * D + (NS + gluon_bwd.DO_STAGES[D]) * BM * D + WN * BN * BM) * 2 + tiles * BM * (D // WN) * 4
    assert need <= ck.metadata.shared <= 227 * 1024, (need, ck.metadata.shared)
    if D == 256:
        assert gluon_bwd.DO_STAGES[D] == 1 and WN == 2
        assert {"3", "2", "1", "0"} <= set(ev["wait_group_args"]), ev["wait_group_args"]
        assert writer_bar, "no 2-warp (64-thread) barrier: the d256 dQ writer partition is missing"
    else:
        assert gluon_bwd.DO_STAGES[D] == 2 and WN == 1
        assert max(ev["wait_group_args"]) == "1", ev["wait_group_args"]
        assert re.search(r"st\.global\.v4\.(f32|b32)", ptx), "the first rank's stores"


# ---- deterministic dQ chains ---------------------------------------------------------------

@pytest.mark.parametrize("D,shape,align", [
    (128, (1, 4, 2, 300, 900), "none"),              # 8 key blocks: ranks 0..3 in two chains
    (64, (2, 4, 2, 500, 700), "top_left"),
    (64, (1, 4, 4, 260, 1000), "bottom_right"),
])
@pytest.mark.parametrize("chains", [2, 3])
def test_emulated_chains_give_one_sum_order_and_shorter_waits(D, shape, align, chains):
    """Chains keep the deterministic guarantee: random schedules (1, 2, many SMs) never
    deadlock and give bit-identical fp32 sums, each chain's tiles added in rank order; with
    every CTA resident and one add per round, key block n waits at most its rank n // chains
    rounds (one chain: n), and the result matches the float64 reference."""
    args, want = _problem64(D, shape, align)
    runs = [_emulate(*args, True, slots=slots, seed=seed, acc=torch.float32, chains=chains)
            for slots, seed in ((1, 0), (2, 1), (64, 2), (64, 3))]
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0])
        assert r[3] == runs[0][3]
    assert all(ranks == list(range(len(ranks))) for ranks in runs[0][3].values())
    assert {key[0] for key in runs[0][3]} == set(range(chains))
    lock = _emulate(*args, True, slots=1 << 20, lockstep=True, chains=chains)
    assert max(nb for nb, _ in lock[5]) >= chains
    for nb, waited in lock[5]:
        assert waited <= nb // chains, ("waited past the chain's ranks", nb, waited)
    for g, w in zip(lock[:3], want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_chains_argument_is_validated():
    dout, q, k, v, out, lse = _args(D=128)
    for bad in (0, -1, gluon_bwd.CHAINS_MAX + 1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"chains must be an int in 1\.\.8"):
            gluon_bwd.prepare(dout, q, k, v, out, lse, 0.1, True, False, True, chains=bad)
    with pytest.raises(ValueError, match="chains=2 needs deterministic=True"):
        gluon_bwd.prepare(dout, q, k, v, out, lse, 0.1, True, False, False, chains=2)
    long_ = gluon_bwd.CHAINS_LONG_KEY_BLOCKS
    assert [gluon_bwd.deterministic_chains(n) for n in (1, 2, long_ - 1, long_, 4 * long_)] == [1, 2, 2, 3, 3]
