"""Tiny Hugging Face checkpoints for the GGUF tests: random weights from transformers configs,
saved with save_pretrained, plus small tokenizers trained here with the tokenizers library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: training text for the tokenizers (mixed scripts, digits, punctuation, whitespace runs)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we've got 3 cats & 12 dogs!",
    "def quantize(x):\n    return round(x * 127) / 127  # int8\n\n",
    "Ünïcödé façade naïve café — déjà vu. Привет, мир! 你好，世界。 こんにちは",
    "I'll say: \"don't\" isn't 'can't'. They'RE here, we'D go, you'LL see.",
    "   leading spaces\ttabs\t\tand\nnew\n\nlines   trailing   ",
    "numbers 1 22 333 4444 55555 3.14159 1,000,000 0x1F -7e-3",
    "emoji 🚀🦙✅ and symbols <>[]{}()#@$%^&*+=|~`",
] * 20

#: strings for tokenizer round trips: corpus pieces, mixtures and edge cases
def probe_strings(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = " ".join(CORPUS[:7]).replace("\n", " \n ").split(" ")
    out = list(dict.fromkeys(CORPUS[:7]))
    out += ["", " ", "  ", "\n", "a", "A", "  x", "x  ", "1234567", "'s", "hello world", "Hello World!"]
    while len(out) < n:
        k = int(rng.integers(1, 12))
        sep = [" ", "  ", "", "\n", "\t"][int(rng.integers(0, 5))]
        out.append(sep.join(str(w) for w in rng.choice(words, size=k)))
    return out[:n]


def byte_level_tokenizer(folder: Path, vocab_size: int, pre: str = "gpt2", specials=("<|endoftext|>",)) -> dict:
    """Train a byte-level BPE tokenizer into ``folder``; ``pre`` is gpt2 | llama3 | qwen2 | smollm."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        digits = r"\p{N}{1,3}" if pre == "llama3" else r"\p{N}"
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits
                   + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    eos = specials[0]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
        "add_bos_token": False, "add_eos_token": False,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))
    return {"size": tok.get_vocab_size(), "eos_id": tok.token_to_id(eos)}


def llama_config(vocab: int, **over):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False)
    cfg.update(over)
    return LlamaConfig(**cfg)


def save_model(model, folder: Path, seed: int = 0) -> None:
    """Random (not default-init) weights, so every tensor matters, then save_pretrained."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.03) + (1.0 if p.ndim == 1 else 0.0))
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)


def make_llama(folder: Path, arch: str = "llama", seed: int = 0, **over) -> Path:
    """A tiny LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM with a byte-level tokenizer."""
    import transformers

    pre = {"llama": "llama3", "mistral": "gpt2", "qwen2": "qwen2"}[arch]
    info = byte_level_tokenizer(folder, 320, pre=pre)
    if arch == "llama":
        cfg = llama_config(info["size"], **over)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        base = dict(vocab_size=info["size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                    rope_theta=10000.0)
        if arch == "mistral":
            cfg = transformers.MistralConfig(**{**base, "sliding_window": None, "tie_word_embeddings": False, **over})
            model = transformers.MistralForCausalLM(cfg)
        else:
            cfg = transformers.Qwen2Config(**{**base, "tie_word_embeddings": True, **over})
            model = transformers.Qwen2ForCausalLM(cfg)
    model.config.bos_token_id = model.config.eos_token_id = info["eos_id"]
    save_model(model, folder, seed)
    return folder


def make_gpt2(folder: Path, seed: int = 0, **over) -> Path:
    import transformers

    info = byte_level_tokenizer(folder, 320, pre="gpt2")
    cfg = transformers.GPT2Config(**{**dict(vocab_size=info["size"], n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=info["eos_id"], eos_token_id=info["eos_id"]), **over})
    save_model(transformers.GPT2LMHeadModel(cfg), folder, seed)
    return folder


def hf_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def sentencepiece_style_tokenizer(folder: Path, vocab_size: int = 400) -> dict:
    """A LLaMA-2 / Mistral style tokenizer.json: BPE over "▁"-joined text with byte fallback
    (<0x00>..<0xFF> in the vocabulary after <unk> <s> </s>), trained here on CORPUS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    base = Tokenizer(models.BPE())
    base.normalizer = norm
    n_merges = vocab_size - 3 - 256
    trainer = trainers.BpeTrainer(vocab_size=n_merges + 64, show_progress=False, limit_alphabet=64)
    base.train_from_iterator(CORPUS, trainer)
    learned = json.loads(base.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for text, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if text not in vocab and len(vocab) < vocab_size:
            vocab[text] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    return {"size": tok.get_vocab_size(), "bos_id": 1, "eos_id": 2}
