"""Key files a service makes at its first start (the audit signing key, the webhook secret
key): written whole or not at all, readable by their owner only, and never replaced by a
second replica starting at the same moment."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_new(path: Path, data: bytes) -> bool:
    """Writes `data` to `path` only if nothing is there; mode 0600. False when another
    process got there first: its file wins, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own (replicas in containers may all be pid 1); mkstemp makes it 0600.
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        temporary.unlink()
