"""Synthetic posterior-fossa phantoms (ceT1 and hrT2) with VS and cochlea labels."""
from .generator import PhantomCase, make_case, write_case, write_phantoms  # noqa: F401
