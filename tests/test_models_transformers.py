"""Real transformers models built from tiny configs (random weights, nothing downloaded): every
attention layer is found and rewritten under force_rewrite, and outputs and parameter gradients
match eager.  Encoder-decoders count self- and cross-attention."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fa3_inductor  # noqa: E402
from helpers import assert_within_2x, clear_reports, compile_fa3, describe_reports, explain, \
    rewritten_sites, run_and_compare  # noqa: E402

V = 97      # vocab
T = 12      # sequence length
BATCH = 2


def ids(seed=0, t=T):
    return torch.randint(3, V, (BATCH, t), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(t=T):
    am = torch.ones(BATCH, t, dtype=torch.long)
    am[0, :3] = 0
    return am


def right_pad_mask(t=T):
    am = torch.ones(BATCH, t, dtype=torch.long)
    am[0, -3:] = 0
    return am


def _cfg(cls, attn, over, **kw):
    cfg = cls(**{**kw, **over})  # `over`: a caller's sizes (the GPU tests build larger models)
    cfg._attn_implementation = attn
    return cfg


def llama(attn, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(_cfg(LlamaConfig, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64))


def mistral(attn, **over):
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(_cfg(MistralConfig, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, sliding_window=4))


def qwen2(attn, **over):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(_cfg(Qwen2Config, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                 max_position_embeddings=64))


def gpt2(attn, **over):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(_cfg(GPT2Config, attn, over, vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))


def gpt_neox(attn, **over):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(_cfg(GPTNeoXConfig, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                   attention_dropout=0.0, hidden_dropout=0.0))


def opt(attn, **over):
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(_cfg(OPTConfig, attn, over, vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                               dropout=0.0, attention_dropout=0.0))


def bert(attn, **over):
    from transformers import BertConfig, BertModel
    return BertModel(_cfg(BertConfig, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def t5(attn, **over):
    from transformers import T5Config, T5Model
    return T5Model(_cfg(T5Config, attn, over, vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                        num_decoder_layers=1, num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8))


def gemma2(attn, **over):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(_cfg(Gemma2Config, attn, over, vocab_size=V, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=5.0,
                                  final_logit_softcapping=None, query_pre_attn_scalar=8))


def bart(attn, **over):
    from transformers import BartConfig, BartModel
    return BartModel(_cfg(BartConfig, attn, over, vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                          activation_dropout=0.0))


def vit(attn, **over):
    from transformers import ViTConfig, ViTModel
    return ViTModel(_cfg(ViTConfig, attn, over, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, image_size=16, patch_size=4, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def mpt(attn, **over):
    # ALiBi built for max_seq_len in the graph, squeezed and sliced to the keys, then
    # masked_fill(finfo.min) on top: the structural route reads it as alibi + causal + padding.
    from transformers import MptConfig, MptForCausalLM
    return MptForCausalLM(_cfg(MptConfig, attn, over, vocab_size=V, d_model=32, n_heads=4, n_layers=2,
                               expansion_ratio=2, max_seq_len=64))


def causal_lm_inputs():
    return dict(input_ids=ids(), attention_mask=left_pad_mask(), use_cache=False)


def enc_inputs():
    return dict(input_ids=ids(), attention_mask=right_pad_mask())


def seq2seq_inputs():
    return dict(input_ids=ids(), attention_mask=right_pad_mask(), decoder_input_ids=ids(1, t=7), use_cache=False)


def vit_inputs():
    return dict(pixel_values=torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0)))


# name: (builder, inputs, number of attention sites, expected spec fields for every site or None)
MODELS = {
    "llama": (llama, causal_lm_inputs, 2, dict(window_right=0, key_padding=True)),
    "mistral_window": (mistral, causal_lm_inputs, 2, dict(window_right=0, window_left=3)),
    "qwen2": (qwen2, causal_lm_inputs, 2, dict(window_right=0)),
    "gpt2": (gpt2, causal_lm_inputs, 2, dict(window_right=0)),
    "gpt_neox": (gpt_neox, causal_lm_inputs, 2, dict(window_right=0)),
    "opt": (opt, causal_lm_inputs, 2, dict(window_right=0)),
    "bert": (bert, enc_inputs, 2, dict(window_right=None, key_padding=True)),
    "t5": (t5, seq2seq_inputs, 3, dict(scale_repr="1")),
    "gemma2_softcap": (gemma2, causal_lm_inputs, 2, dict(softcap=5.0, window_right=0)),
    "bart": (bart, seq2seq_inputs, 3, None),
    "vit": (vit, vit_inputs, 2, dict(window_right=None, mask_kind=None, key_padding=False)),
    "mpt_alibi": (mpt, causal_lm_inputs, 2, dict(window_right=0, key_padding=True, alibi="linear",
                                                masked_value="min_fill", mask_kind=None)),
}


def build(name, attn="eager", train=False):
    torch.manual_seed(0)
    builder, inputs, n, exp = MODELS[name]
    m = builder(attn)
    m.train(train)
    return m, inputs(), n, exp


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_every_layer_matched(name):
    m, kw, n, exp = build(name)
    with torch.no_grad():
        rep = explain(m, **kw)
    assert len(rep.matched) == n, f"{name}: {len(rep.matched)} of {n} attention layers matched\n{rep}"
    for site in rep.matched:
        for field, want in (exp or {}).items():
            got = getattr(site.spec, field)
            if field == "window_left" and name == "mistral_window":
                # HF's sliding window keeps sliding_window tokens including the diagonal
                assert got in (3, 4), str(rep)
                continue
            assert got == want, f"{name}: spec.{field} = {got!r}, expected {want!r}\n{rep}"


@pytest.mark.parametrize("name", list(MODELS))
def test_forced_rewrite_matches_eager_eval(name):
    m, kw, n, _ = build(name)
    run_and_compare(m, (), kw, n_rewritten=n, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "bart", "mpt_alibi"])
def test_forced_rewrite_matches_eager_train(name):
    m, kw, n, _ = build(name, train=True)
    run_and_compare(m, (), kw, n_rewritten=n, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", ["llama", "bert", "vit", "t5"])
def test_sdpa_attention_rewritten(name):
    m, kw, n, _ = build(name, attn="sdpa")
    run_and_compare(m, (), kw, n_rewritten=n, atol=2e-4, rtol=2e-4, config=dict(sdpa_rewrite="always"))


def test_llama_inductor_end_to_end():
    m, kw, n, _ = build("llama")
    run_and_compare(m, (), kw, n_rewritten=n, atol=2e-4, rtol=2e-4, inductor=True)


def _llama_gqa4_bf16():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = _cfg(LlamaConfig, "eager", {}, vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).train()


def test_llama_gqa4_causal_bf16_training_explain():
    m = _llama_gqa4_bf16()
    rep = explain(m, input_ids=ids(), attention_mask=left_pad_mask(), use_cache=False)
    assert len(rep.matched) == 2, str(rep)
    for s in rep.matched:
        assert s.gqa_group == 4, str(rep)
        assert s.k_shape[1] == 2 and s.q_shape[1] == 8
        assert s.spec.causal and s.spec.out_dtype == "bfloat16" and s.spec.key_padding
    assert "gqa=4:1" in str(rep)


def test_llama_gqa4_causal_bf16_training_numerics():
    """bf16 training step: logits and parameter gradients within 2x of eager bf16's error vs float64."""
    m = _llama_gqa4_bf16()
    eager = copy.deepcopy(m)
    ref = copy.deepcopy(m).double()
    # right padding: no query row is fully masked (left padding makes HF's float64 model NaN)
    kw = dict(input_ids=ids(), attention_mask=right_pad_mask(), use_cache=False)
    clear_reports()
    with fa3_inductor.config.patch(force_rewrite=True):
        out = compile_fa3(m)(**kw).logits
        assert len(rewritten_sites()) == 2, describe_reports()
    e = eager(**kw).logits
    r = ref(**kw).logits
    # the comparison covers the real tokens
    valid = kw["attention_mask"].bool()
    assert_within_2x(out[valid], e[valid], r[valid], what="logits")
    assert torch.isfinite(out).all()
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = g * valid[..., None]
    r = torch.nan_to_num(r)
    with fa3_inductor.config.patch(force_rewrite=True):
        (out.double() * g).sum().backward()
    (e.double() * g).sum().backward()
    (r * g).sum().backward()
    for (name, p1), (_, p2), (_, p3) in zip(m.named_parameters(), eager.named_parameters(), ref.named_parameters()):
        if "self_attn" in name:
            assert_within_2x(p1.grad, p2.grad, p3.grad, what=f"grad {name}",
                             slack=2e-2 * max(1.0, p3.grad.abs().max().item()))


def test_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=32, num_heads=4, num_classes=5)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    run_and_compare(m, (x,), n_rewritten=2, atol=2e-4, rtol=2e-4)
