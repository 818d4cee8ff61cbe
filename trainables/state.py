"""Saving and restoring a `Trainer`'s state as bytes, and writing them atomically to a local path or URI."""

from __future__ import annotations

import io
import os

import pyarrow.fs
import torch


def to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    # Our own files: the state holds RNG states and plain Python objects, not only tensors.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def write_atomic(uri: str, data: bytes) -> None:
    """Write `data` to a local path or URI; locally via a temporary file and a rename, so a kill leaves the old file."""
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_if_exists(uri: str) -> bytes | None:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()
