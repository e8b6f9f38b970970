"""A genuine CLIP BPE tokenizer built offline from the toy world's vocabulary.

CLIP's BPE works on byte-level characters with an end-of-word marker "</w>". We keep all 256
byte characters (alone and as word ends) so any text tokenizes, misspellings included, and add
BPE merges learned on the world's words so that each becomes one token. Unknown words fall back to
sub-word pieces, exactly like real CLIP with rare words.
"""
from __future__ import annotations

import re

from transformers import CLIPTokenizer

from .world import vocabulary

MAX_LENGTH = 32  # prompts in the toy world are short; SD uses 77


def _bytes_to_unicode() -> list[str]:
    # the same reversible byte -> printable character table as GPT-2 / CLIP
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Classic BPE learning (Sennrich et al.): merge the most frequent adjacent pair until every
    word is one symbol. Ties break lexicographically so the result is reproducible."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words if w]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seq in enumerate(seqs):
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(seq[j] + seq[j + 1])
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def build_tokenizer(words: list[str] | None = None, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE turns each world word into one token."""
    words = words if words is not None else vocabulary()
    pieces = sorted({p for w in words for p in _pieces(w)})
    merges = learn_bpe(pieces)
    chars = _bytes_to_unicode()
    # every byte character alone and as a word end, so any text (misspellings too) tokenizes
    tokens = chars + [c + "</w>" for c in chars]
    base = set(tokens)
    tokens += [a + b for a, b in merges if a + b not in base]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _pieces(word: str) -> list[str]:
    return [p for p in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", word.lower()) if p]
