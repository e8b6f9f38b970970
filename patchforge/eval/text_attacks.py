"""Text attacks: prompts that ask for an erased concept without its exact wording (misspellings,
paraphrases, descriptions, padding). Plain string work, shared by `patchforge attack`, the eval's
robustness rows and concept worlds that know their concepts' aliases."""
from __future__ import annotations

import re

PADDING = "detailed, {}, high quality"


def misspell(word: str) -> str:
    """Swap two letters: inner ones (stripes -> stirpes), the last two in short words (star -> stra)."""
    i = len(word) // 2 if len(word) >= 5 else len(word) - 1
    return word[:i - 1] + word[i] + word[i - 1] + word[i + 1:]


def replace_word(text: str, word: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", lambda m: new.capitalize() if m.group(0)[0].isupper() else new, text,
                  flags=re.IGNORECASE)


def article_free(prompt: str) -> str:
    """'a photo of a red star' -> 'a red star' (the object phrase a paraphrase template wraps)."""
    return prompt.removeprefix("a photo of ").removeprefix("a picture of ")


def catalogue_attacks(concept: str, templates: list[str], n: int = 4) -> dict[str, list[str]]:
    """Attack prompts per text attack for a concept of the real catalogue (its target prompts)."""
    base = templates[:n]
    return {"misspelling": [replace_word(p, concept, misspell(concept)) for p in base],
            "paraphrase": [f"an image showing {p}" for p in base],
            "padding": [PADDING.format(p) for p in base]}
