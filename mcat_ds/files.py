"""Writing files so that a crash leaves either the old content or the new, never a cut file.

A reader that finds a truncated CSV or JSON file after a killed job cannot tell it from a real
result; writing to a temporary sibling and renaming it over the final name makes the change
all-or-nothing on POSIX filesystems.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def naming(error: OSError, path: Path) -> OSError:
    """``error`` with the path it happened to, for a write whose OSError names none (a full disk
    reported by ``write`` or ``close``: "[Errno 28] No space left on device" alone)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


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
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise naming(error, path) from error
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a file written by a library that does not (safetensors, tarfile) before a later write
    claims it complete: client caches on Lustre and NFS may otherwise publish the claim first."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def staging_sibling(final: Path) -> Path:
    """Where a directory is built before it is renamed to ``final``: named after this host and
    process, so that a later run can tell a dead writer's leftovers from a live one's work."""
    final = Path(final)
    return final.with_name(f"{final.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove the ``staging_sibling`` folders of ``final`` left by writers that died on this host
    (another host's, or a live process's, are left alone); returns what was removed."""
    final = Path(final)
    host = socket.gethostname()
    removed = []
    for candidate in final.parent.glob(f"{glob.escape(final.name)}.partial-*"):
        writer = candidate.name[len(final.name) + len(".partial-"):]
        writer_host, _, pid = writer.rpartition("-")
        if not pid.isdigit() or (writer_host and writer_host != host) or _process_alive(int(pid)):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def fsync_tree(directory: Path) -> None:
    """Flush every file and folder under ``directory``, and the directory itself, before it is
    renamed into place: the libraries that wrote them (safetensors, transformers) do not, so a
    power cut could otherwise leave the final name pointing at empty files."""
    for root, _, names in os.walk(directory, topdown=False):
        for name in names:
            fsync_file(Path(root) / name)
        fsync_directory(Path(root))


def read_json_object(path: Path) -> dict:
    """A JSON object from a file, or ValueError naming the file when it is cut, not UTF-8, not JSON
    or not an object."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except ValueError as error:  # bad UTF-8 and bad JSON both
        raise ValueError(f"{path}: damaged, not UTF-8 JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: damaged, expected a mapping at the top level")
    return value


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks (checkpoints are GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def building_directory(final: Path, publish: Callable[[Path, Path], None] = os.replace) -> Iterator[Path]:
    """A directory built in a ``staging_sibling`` (yielded, created empty) and, when the block ends
    without an error, flushed and published as ``final`` with ``publish(staging, final)`` (a plain
    rename by default; it replaces an empty ``final`` in one step). A failed block removes the
    staging folder, so ``final`` is complete or untouched; dead writers' folders go first."""
    final = Path(final)
    remove_stale_staging(final)
    staging = staging_sibling(final)
    shutil.rmtree(staging, ignore_errors=True)  # only a dead process with this host and pid could have left it
    staging.mkdir(parents=True)
    try:
        yield staging
        fsync_tree(staging)
        publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(final.parent)
