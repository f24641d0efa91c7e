"""Tiny random transformers built in-process from configs (no download), one per supported family."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "gpt2", "gpt_neox", "opt", "bert", "vit", "qwen2", "gemma")
VOCAB = 128


def tiny_config(family: str):
    import transformers as T

    common = dict(num_hidden_layers=2, num_attention_heads=4)
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, vocab_size=VOCAB, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=96, num_key_value_heads=2, vocab_size=VOCAB, **common)
    if family == "gemma":
        return T.GemmaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2, head_dim=16,
                             vocab_size=VOCAB, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=VOCAB, bos_token_id=0,
                            eos_token_id=0)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=96, vocab_size=VOCAB, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=96, vocab_size=VOCAB, word_embed_proj_dim=64, bos_token_id=0,
                           eos_token_id=0, pad_token_id=1, **common)
    if family == "bert":
        return T.BertConfig(hidden_size=64, intermediate_size=96, vocab_size=VOCAB, **common)
    if family == "vit":
        return T.ViTConfig(hidden_size=64, intermediate_size=96, image_size=8, patch_size=2, num_channels=1,
                           num_labels=10, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, head: bool = True):
    """A tiny randomly initialised model of ``family`` in eval mode (with its LM/classification head)."""
    import transformers as T

    cfg = tiny_config(family)
    torch.manual_seed(seed)
    if not head:
        model = T.AutoModel.from_config(cfg)
    elif family == "bert":
        model = T.BertForMaskedLM(cfg)
    elif family == "vit":
        model = T.ViTForImageClassification(cfg)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def tiny_inputs(family: str, batch: int = 2, seq: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 1, 8, 8, generator=g)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=g)}


def char_tokenizer():
    """A character-level tokenizer over printable ASCII (97 ids < VOCAB), built in-process."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1}
    for ch in string.printable[:95]:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")


def write_corpus(path, n_docs: int = 40, seed: int = 0, words=("alpha", "beta", "gamma", "delta")) -> str:
    """A small text file of blank-line separated documents; returns the path as a string."""
    import random

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs))
    return str(path)


def save_tiny_lm(path, family: str = "llama", seed: int = 0):
    """A tiny causal LM with the character tokenizer saved as a model directory; returns ``path``."""
    tiny_model(family, seed=seed).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
