"""User-facing errors. Anything a user can cause (bad file, wrong base, unknown concept, bad path)
raises a PatchforgeError whose message is one line saying what is wrong and what to do; the CLI
prints it without a traceback."""


class PatchforgeError(Exception):
    pass


class PatchFormatError(PatchforgeError):
    """A patch file that is corrupt, not safetensors, or not a forget patch."""


class BaseModelMismatch(PatchforgeError):
    """A patch made for another base model."""


class UnknownConcept(PatchforgeError):
    """A concept spec that the catalog does not know."""


def one_line(text, limit: int = 80) -> str:
    """Text from a file or a user, safe to put in a one-line message: control characters (newlines,
    escape sequences) become spaces, and it is cut at `limit` characters."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."
