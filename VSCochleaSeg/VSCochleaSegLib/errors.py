"""Exceptions the engine raises. Each message says what is wrong and what the user can do."""


class VSCochleaSegError(Exception):
    """Base class: every error the engine raises on purpose derives from this."""


class InputError(VSCochleaSegError):
    """The input scan cannot be used (unreadable, wrong dimensionality, bad geometry, ...)."""


class ModelError(VSCochleaSegError):
    """A model folder is missing, damaged, or does not match this engine."""


class OutputExistsError(VSCochleaSegError):
    """An output file exists and overwriting was not requested."""


class Cancelled(VSCochleaSegError):
    """The caller's cancel callback asked to stop; nothing was written."""
