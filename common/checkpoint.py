"""Atomic checkpoints: a nested dict of arrays and numbers in one msgpack file.

A checkpoint is written to a temporary file in the same folder, flushed to disk and then
renamed over the old one, so a crash (even SIGKILL) leaves either the old or the new file,
never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from flax import serialization

from common.cli import UserError


def save(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` (dicts, lists, numpy/JAX arrays, numbers, strings) to `path` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = serialization.msgpack_serialize(payload)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; use the user's umask
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint written by `save`; a missing or unreadable file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}.")
    try:
        with open(path, "rb") as file:
            payload = serialization.msgpack_restore(file.read())
    except Exception as error:  # msgpack raises several types for damaged files
        raise UserError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(payload, dict):
        raise UserError(f"cannot read checkpoint {path}: not a checkpoint of this project.")
    return payload
