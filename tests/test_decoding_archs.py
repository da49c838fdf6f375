"""Every architecture that trains also decodes: tiny models built from configs (sliding windows, MLA, linear attention, state-space
hybrids) decode greedily as the model itself does, and speculatively (parallel and MLP heads) identically, or are refused before decoding."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from wmtp.hf import HFMTPModel

SMALL = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=0)
# arch: (config keywords, None if speculative decoding works, else a phrase of its refusal)
ARCHS = {
    "llama": ({}, None),
    "gemma3_text": (dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"]), None),  # window reached
    "mistral": (dict(sliding_window=8), None),
    "qwen2": (dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), None),
    "olmo3": (dict(sliding_window=8), None),
    "exaone4": (dict(sliding_window=8), None),
    "lfm2": ({}, None),  # short convolutions beside attention
    "deepseek_v3": (dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1), None),
    # MLA with fewer key/value heads than heads: transformers' own cached forward of several tokens fails
    "deepseek_v3-gqa": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16,
                             q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
                        "its own cached forward of several new tokens fails"),
    "qwen3_next": (dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                        full_attention_interval=2), "whose recurrent state cannot drop rejected drafts"),
    "jamba": (dict(num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
              "whose recurrent state cannot drop rejected drafts"),
    "bamba": (dict(attn_layer_indices=[1, 3]), "whose recurrent state cannot drop rejected drafts"),
    "nemotron_h": ({}, "whose recurrent state cannot drop rejected drafts"),
    "falcon_h1": ({}, "whose recurrent state cannot drop rejected drafts"),
}


def _lm(arch):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(arch.split("-")[0], **SMALL | ARCHS[arch][0])
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _greedy(lm, ids, n):
    "The plain definition: the model on the whole sequence, argmax, append (no cache, no stopping at end-of-text)."
    with torch.no_grad():
        for _ in range(n): ids = torch.cat([ids, lm(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decodes_or_refuses(arch):
    "Greedy equals the model's own greedy; speculative (parallel and MLP heads) equals it too, or is refused before decoding."
    lm, refusal = _lm(arch), ARCHS[arch][1]
    prompt = torch.randint(2, 384, (1, 12), generator=torch.Generator().manual_seed(0))  # 12 + 20 tokens: past every 8-token window
    ref = _greedy(lm, prompt, 20)
    for heads in ("parallel", "mlp"):
        m = HFMTPModel(lm, n_future=3, heads=heads).eval()
        assert torch.equal(m.generate(prompt, 20), ref)
        if refusal is None:
            with torch.no_grad():
                if heads == "mlp":  # random MLP heads, so drafts differ from head 0's and some are rejected
                    m.heads[0].weight.normal_(0, 0.05)
            out, st = m.generate(prompt, 20, speculative=True, return_stats=True, draft_threshold=0.0, adapt_heads=False)
            assert torch.equal(out, ref), (arch, heads)
            assert sum(st["drafted_per_head"]) > 0
        else:
            with pytest.raises(ValueError, match=refusal) as e:
                m.generate(prompt, 20, speculative=True)
            assert "speculative=False" in str(e.value) and "\n" not in str(e.value)


def test_cache_without_attention_is_refused():
    "A model whose cache holds only recurrent layers cannot be driven by wmtp's cached decoding: refused with what works instead."
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("bamba", **SMALL)).eval()  # every layer a state space
    with pytest.raises(ValueError, match=r"has no attention layer.*model\.lm\.generate"):
        HFMTPModel(lm, n_future=2).generate(torch.tensor([[5, 6, 7]]), 4)
