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
