"""Writing files so that a crash leaves either the old content or the new, never a cut file.

A reader that finds a truncated CSV or JSON file after a killed job cannot tell it from a real
result; writing to a temporary sibling and renaming it over the final name makes the change
all-or-nothing on POSIX filesystems.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk.

    Some platforms and filesystems refuse to open or fsync a directory; the rename has then
    happened all the same, only its durability across a power cut is not promised.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` in one step: readers see the old file or the new one.

    The temporary file sits in the same folder (a rename across filesystems is not atomic) and
    carries the pid, so two processes writing the same path do not share one.
    """
    path = Path(path)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with open(staging, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
