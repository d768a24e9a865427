"""The files a run writes and reads back (checkpoints, replay files, the training env's state): stored as what
torch.load(weights_only=True) reads, so that loading a shared file runs no code, with a digest of the contents
that a load checks, so that a damaged file is never trained from.
"""
import hashlib
import os
import pickle
import stat
from typing import Any

import numpy as np
import torch

# Checkpoints, replay files and env states hold only what torch.load(weights_only=True) reads (tensors, numbers,
# strings, lists, tuples, dicts), so loading a shared file runs no code; numpy arrays and generators are stored
# as tagged dicts. Format 1 (written before 2026-12-07) held pickled numpy objects: only unpickling reads it.
STATE_FORMAT = 2
FORMAT_KEY, DIGEST_KEY = "format_version", "content_sha256"
_NDARRAY, _GENERATOR = "__ndarray__", "__numpy_generator__"


def to_plain(value: Any) -> Any:
    """value with numpy arrays, scalars and generators replaced by what weights_only loading accepts."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"a numpy array of dtype {value.dtype} cannot be stored")
        return {_NDARRAY: torch.from_numpy(np.array(value, copy=True, order="C"))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.random.Generator):
        return {_GENERATOR: type(value.bit_generator).__name__, "state": value.bit_generator.state}
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be stored in a checkpoint")


def from_plain(value: Any) -> Any:
    """to_plain's inverse."""
    if isinstance(value, dict):
        if _NDARRAY in value:
            return value[_NDARRAY].numpy()
        if _GENERATOR in value:
            generator = np.random.Generator(getattr(np.random, value[_GENERATOR])())
            generator.bit_generator.state = value["state"]
            return generator
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(v) for v in value)
    return value


def content_digest(value: Any) -> str:
    """SHA-256 of a plain value's contents (tensors' dtype, shape and bytes, numbers exactly, keys in order)."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}:".encode())
            for key, item in v.items():
                feed(key)
                feed(item)
        elif isinstance(v, (list, tuple)):
            digest.update(f"{'L' if isinstance(v, list) else 'U'}{len(v)}:".encode())
            for item in v:
                feed(item)
        elif isinstance(v, float):
            digest.update(f"F{v.hex()};".encode())
        elif isinstance(v, str):
            digest.update(f"S{len(v.encode())}:".encode() + v.encode())
        else:  # None, bool, int
            digest.update(f"{type(v).__name__}{v!r};".encode())

    feed(value)
    return digest.hexdigest()


class UntrustedFileError(ValueError):
    """A file that only unpickling reads (a format-1 checkpoint, or anything else): never loaded."""


def load_state_file(path: Any, map_location: Any = "cpu") -> Any:
    """The contents of a checkpoint or replay file (write_state_file), read without running code and checked
    against its digest; a ValueError with the one-line reason if it cannot be read, is damaged or would need
    unpickling (UntrustedFileError)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ValueError("not a regular file")
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # what weights_only refuses: an object that only unpickling would build
        raise UntrustedFileError(
            f"{path} is not a checkpoint of format {STATE_FORMAT}: it holds objects only unpickling reads, which "
            f"can run code (format 1, written before 2026-12-07, or not this project's); if you trust the file, "
            f"convert it: python tools/convert_checkpoint.py --trust {path}") from None
    except (RuntimeError, KeyError, EOFError, ValueError, TypeError, OSError, IndexError) as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a mapping, found a {type(loaded).__name__}")
    if FORMAT_KEY in loaded:
        if loaded[FORMAT_KEY] != STATE_FORMAT:
            raise ValueError(f"format {loaded[FORMAT_KEY]!r}, this version reads format {STATE_FORMAT}")
        digest = loaded.pop(DIGEST_KEY, None)
        del loaded[FORMAT_KEY]
        if digest != content_digest(loaded):
            raise ValueError("damaged: its contents do not match the digest written with them")
    return from_plain(loaded)


