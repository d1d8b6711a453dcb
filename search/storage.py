"""Small files in the experiment folder, which is a local path or a URI Ray accepts (s3://, gs://, ...)."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any


class StorageError(RuntimeError):
    """A storage location a search cannot use; the message names it, says why and what is allowed."""


ALLOWED = "a folder you can write, or a URI Ray accepts (s3://, gs://, file://)"


def unique_name(prefix: str) -> str:
    """``<prefix>-<date>-<time>-<6 hex>``: two searches started in the same second get two folders."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_writable(root: str) -> None:
    """Create (if needed) and write a file into the storage root, then remove it: StorageError if that fails."""
    probe = f".csl-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if is_uri(root):
            fs, base = filesystem(root)
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base.rstrip('/')}/{probe}") as f:
                f.write(b"")
            fs.delete_file(f"{base.rstrip('/')}/{probe}")
            return
        folder = Path(root)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        (folder / probe).unlink()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise StorageError(f"--storage {root}: cannot write there ({reason}); allowed: {ALLOWED}") from None


def create_folder(path: str) -> None:
    """Create an experiment folder that must not exist yet (locally this is atomic: one of two racers wins)."""
    if is_uri(path):
        if exists(path):
            raise StorageError(f"{path}: the experiment folder exists; allowed: a new --name, or csl-search "
                               f"resume {path}")  # fmt: skip
        fs, base = filesystem(path)
        fs.create_dir(base, recursive=True)
        return
    try:
        os.mkdir(path)
    except FileExistsError:
        raise StorageError(f"{path}: the experiment folder exists; allowed: a new --name, or csl-search resume "
                           f"{path}") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise StorageError(f"{path}: cannot create the experiment folder ({reason}); allowed: {ALLOWED}") from None


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def normalise(storage: str) -> str:
    """A local folder as an absolute path (``file://`` URIs too); other URIs as given."""
    if storage.startswith("file://"):
        storage = storage[len("file://") :]
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def write_text(path: str, text: str) -> None:
    """Write a whole file; a local one atomically (a reader, or a kill, never sees half of it)."""
    if not is_uri(path):
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, fs_path = filesystem(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as f:
        f.write(text.encode())


def remove_empty_folder(path: str) -> None:
    """Remove a local folder this search made and left empty (a start that failed right after making it)."""
    if is_uri(path):
        return
    try:
        Path(path).rmdir()  # only ever an empty folder
    except OSError:
        pass


def append_line(path: str, line: str) -> None:
    """Add one line to a file: appended and synced locally; read and written whole on object stores."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
        return
    try:
        text = read_text(path)
    except FileNotFoundError:
        text = ""
    write_text(path, text + line.rstrip("\n") + "\n")


def read_bytes(path: str) -> bytes:
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as f:
        return f.readall()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, fs_path = filesystem(path)
    return fs.get_file_info(fs_path).type != pafs.FileType.NotFound
