"""Real models on the H100 through backend="fa3" (our kernels, no force_rewrite): every
attention layer rewritten, outputs and parameter gradients within the numerics bar of eager.

The models are the CPU suite's (tests/test_models_transformers.py) built at a size the kernels
serve (head dim 64, 8 heads, a few hundred tokens, bf16) instead of the CPU's head dim 8.
Bar: our error against a float64 run of the same model is at most 2x eager's error in the
input precision, plus a small absolute slack (2e-2, or 2e-2 x the largest gradient)."""
import copy

import pytest
import torch

from fa3_inductor import backend as fa3_backend_mod

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 GPU", allow_module_level=True)

transformers = pytest.importorskip("transformers")
import test_models_transformers as zoo  # noqa: E402  (tests/ is on sys.path via conftest)

S = 300          # encoder / decoder-only tokens
S_DEC = 130      # seq2seq decoder tokens (cross-attention: S_DEC x S)
_DEC = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, max_position_embeddings=1024)

# model name -> config overrides that make head dim 64 with 8 query heads
SIZES = {
    "llama": dict(_DEC, num_key_value_heads=2),
    "mistral_window": dict(_DEC, num_key_value_heads=2, sliding_window=64),
    "qwen2": dict(_DEC, num_key_value_heads=2),
    "gpt2": dict(n_embd=512, n_head=8, n_positions=1024),
    "gpt_neox": dict(_DEC),
    "opt": dict(hidden_size=512, ffn_dim=1024, num_attention_heads=8, max_position_embeddings=1024,
                word_embed_proj_dim=512),
    "bert": dict(_DEC),
    "t5": dict(d_model=512, d_kv=64, d_ff=1024, num_heads=8),
    "gemma2_softcap": dict(_DEC, num_key_value_heads=2, head_dim=64, sliding_window=64,
                           query_pre_attn_scalar=64),
    "bart": dict(d_model=512, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=1024,
                 decoder_ffn_dim=1024, max_position_embeddings=1024),
    "vit": dict(hidden_size=512, num_attention_heads=8, intermediate_size=1024, image_size=224, patch_size=16),
}


@pytest.fixture(autouse=True)
def _all_sizes():
    """These models are small (S=300): the size policy would leave their training attention to
    Inductor; the test is of our kernels, so it is off (tests/conftest.py restores the config)."""
    import fa3_inductor
    fa3_inductor.config.min_train_attention_flops = 0


def _ids(seed, t):
    return torch.randint(3, zoo.V, (2, t), generator=torch.Generator().manual_seed(seed)).cuda()


def _padding(t, left=True):
    am = torch.ones(2, t, dtype=torch.long, device="cuda")
    if left:
        am[0, :37] = 0
    am[1, -20:] = 0
    return am


def _inputs(name):
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda())
    if name in ("t5", "bart"):
        return dict(input_ids=_ids(0, S), attention_mask=_padding(S, left=False),
                    decoder_input_ids=_ids(1, S_DEC), use_cache=False)
    if name == "bert":
        return dict(input_ids=_ids(0, S), attention_mask=_padding(S))
    if name == "llama":  # no padding: the causal path alone
        return dict(input_ids=_ids(0, S), attention_mask=torch.ones(2, S, dtype=torch.long, device="cuda"),
                    use_cache=False)
    # Left padding makes fully masked query rows.  Models with an fp32 softmax upcast turn the
    # float64 reference's finfo(float64).min into -inf there (NaN rows that neither low-precision
    # run has), so only GPT-2 (no upcast) keeps left padding; the others pad on the right.
    return dict(input_ids=_ids(0, S), attention_mask=_padding(S, left=(name == "gpt2")), use_cache=False)


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def _check_grads(model, model64, grads_sum):
    """`grads_sum` holds compiled + eager gradients (they share parameters); `model`'s .grad eager alone.

    Per parameter: error <= 2x eager's + 2e-2 x its largest gradient + 1e-3 x the model's median
    largest gradient.  The last term is the absolute slack for parameters whose exact gradient is
    zero (key biases: softmax ignores a per-row shift), where only rounding noise is compared: a
    flash-style backward (ours, FA2/FA3, cuDNN) computes D = rowsum(dO * O) from the rounded
    output, eager from its own rounded probabilities, so their noise differs in kind."""
    named64 = dict(model64.named_parameters())
    scales = [p.grad.abs().max().item() for p in named64.values() if p.grad is not None]
    floor = 1e-3 * sorted(scales)[len(scales) // 2]
    for gs, (name, p) in zip(grads_sum, model.named_parameters()):
        p64 = named64[name]
        if p64.grad is None:
            continue
        ge = p.grad.double()
        go = gs - ge
        err_o = (go - p64.grad).abs().max().item()
        err_e = (ge - p64.grad).abs().max().item()
        scale = p64.grad.abs().max().item()
        assert err_o <= 2 * err_e + 2e-2 * scale + floor, (name, err_o, err_e, scale, floor)


# Sites left to Inductor by design on the device's transformers (5.17), with the reason checked:
# T5's relative position bias is a true dense bias (the backend leaves dense [Sq, Sk] tensors to
# Inductor: measured slower fused, docs/perf.md); OPT and BART in training call torch.rand for
# layerdrop, a graph break that hands the mask to the attention graph as an input.
DENSE_LEFT = {("t5", False): 3, ("t5", True): 3, ("opt", True): 2, ("bart", True): 3}

EVAL = [(n, False, torch.bfloat16) for n in SIZES] + [("llama", False, torch.float16)]
TRAIN = [(n, True, torch.bfloat16) for n in ("llama", "mistral_window", "qwen2", "gpt2", "gemma2_softcap",
                                              "bert", "t5", "bart", "vit", "gpt_neox", "opt")]


@pytest.mark.parametrize("name,train,dtype", TRAIN + EVAL,
                         ids=[f"{n}-{'train' if t else 'eval'}-{str(d)[6:]}" for n, t, d in TRAIN + EVAL])
def test_model_matches_eager(name, train, dtype):
    torch.manual_seed(0)
    builder, _, n_sites, _ = zoo.MODELS[name]
    model64 = builder("eager", **SIZES[name]).double().cuda().train(train)
    for mod in model64.modules():  # dropout off: compare exact functions
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    model = copy.deepcopy(model64).to(dtype)
    kw = _inputs(name)
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    kw_lo = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}

    fa3_backend_mod.REPORTS.clear()
    compiled = torch.compile(model, backend="fa3")
    with torch.set_grad_enabled(train):
        ours = _out(compiled(**kw_lo))
        eager = _out(model(**kw_lo))
        ref = _out(model64(**kw64))
    sites = [(s.source, done, why) for rep in fa3_backend_mod.REPORTS for s, done, why in rep.matched]
    left = [(src, why) for src, done, why in sites if not done]
    # OPT's layerdrop graph break makes each decoder layer its own frame: one compiled layer
    # graph (one site) serves both layers
    assert len(sites) == (1 if (name, train) == ("opt", True) else n_sites), sites
    assert len(left) <= DENSE_LEFT.get((name, train), 0), left
    assert all("dense [Sq, Sk]" in why for _, why in left), left
    # NaN/inf only where eager (same precision) has them; errors where the float64 run is finite
    assert torch.equal(torch.isfinite(ours), torch.isfinite(eager))
    live = torch.isfinite(ref) & torch.isfinite(eager)
    err_ours = (ours.double() - ref)[live].abs().max().item()
    err_eager = (eager.double() - ref)[live].abs().max().item()
    assert err_ours <= 2 * err_eager + 2e-2, (err_ours, err_eager)
    if train:
        g = torch.randn_like(ref)
        ours.double().backward(g)
        eager.double().backward(g)
        ref.backward(g)
        grads_sum = [p.grad.double().clone() if p.grad is not None else None for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        _out(model(**kw_lo)).double().backward(g)
        _check_grads(model, model64, grads_sum)
