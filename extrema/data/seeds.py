"""The seed mixer every seeded draw of the data layer derives from. Torch-free."""

from __future__ import annotations

import hashlib


def seed_of(*parts: int) -> int:
    """A stable 63-bit seed mixed from integers (the same on every machine, process and Python run)."""
    digest = hashlib.blake2b(b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)
