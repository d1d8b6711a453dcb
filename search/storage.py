"""Small files in the experiment folder, which is a local path or a URI Ray accepts (s3://, gs://, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
    fs, fs_path = filesystem(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as f:
        f.write(text.encode())


def read_text(path: str) -> str:
    fs, fs_path = filesystem(path)
    with fs.open_input_stream(fs_path) as f:
        return f.readall().decode()
