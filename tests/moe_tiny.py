"""Tiny random mixture-of-experts models (Mixtral, Qwen2-MoE, OLMoE) built in-process from configs."""

from __future__ import annotations

import torch

from tiny import VOCAB

MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")
N_EXPERTS, TOP_K, HIDDEN, FF = 4, 2, 32, 24


def moe_config(family: str, experts_implementation: str | None = None):
    import transformers as T

    common = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=TOP_K, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "mixtral":
        cfg = T.MixtralConfig(intermediate_size=FF, num_local_experts=N_EXPERTS, **common)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=FF, shared_expert_intermediate_size=20,
                               num_experts=N_EXPERTS, **common)
    elif family == "olmoe":
        cfg = T.OlmoeConfig(intermediate_size=FF, num_experts=N_EXPERTS, **common)
    else:
        raise ValueError(family)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return cfg


def moe_model(family: str, seed: int = 0, experts_implementation: str | None = None):
    """A tiny random causal LM of ``family`` (2 layers, 4 experts, top-2) in eval mode."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(moe_config(family, experts_implementation))
    with torch.no_grad():  # spread the router so that every expert gets tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model.eval()
