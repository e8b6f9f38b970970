"""What a forget patch erases, as the prompt sets a training method needs (built by patchforge.concepts
from the real-model catalogue or a concept file, or by a concept world's plug-in, patchforge.core.worlds)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = ("style", "object", "identity", "color", "nudity", "art", "background", "implicit", "custom")


@dataclass
class ConceptSpec:
    kind: str
    name: str
    target: list[str]
    anchor: list[str]  # one per target prompt
    preserve: list[str]
    to: str | None = None
    guidance: float = 1.0
    words: list[str] = field(default_factory=list)  # the words naming the concept (FMN's attention columns)
    world: str | None = None  # the concept world (patchforge.core.worlds) that made it; None: the real catalogue
    # one per target prompt: the same prompt naming a neighbour instead (target i -> neighbour i mod n),
    # or None where there is none. A method may hold the base's prediction there on the *same* noised
    # latent, so the patch learns what separates the concept from its neighbour, not what they share.
    contrast: list[str | None] = field(default_factory=list)
    # prompts asking for the concept without naming it; never trained on (held out to measure generality)
    paraphrases: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}" + (f"->{self.to}" if self.to else "")

    def to_json(self) -> dict:
        return {"kind": self.kind, "name": self.name, "to": self.to}


def mentions(prompt: str, word: str) -> bool:
    """The prompt names `word` as a whole word (any case)."""
    return re.search(rf"\b{re.escape(word)}\b", prompt, re.IGNORECASE) is not None
