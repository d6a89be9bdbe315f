"""Safetensors files with a JSON header of cnnlab's and a checksum of every tensor, verified on load.

The one reader and writer of the tensor files cnnlab makes (model.safetensors, checkpoint.safetensors,
best-before-divergence.safetensors). A file holds `{name: tensor}` plus header metadata
`{key: JSON, "cnnlab_sha256": hex}`; the checksum covers that JSON and each tensor's name, dtype, shape and bytes,
so a flipped bit anywhere in the data (a bad disk, a bad copy) is reported as a damaged file naming
the path, instead of a model that prints a loss of 2e35 or a checkpoint whose resume "diverges".
Files written before checksums existed still load (unverified).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .fileio import atomic_write_bytes

CHECKSUM_KEY = "cnnlab_sha256"


class TensorFileError(ValueError):
    """A tensor file that is missing, unreadable, truncated or damaged; the message names it."""


def tensors_checksum(tensors: dict[str, torch.Tensor], meta_text: str = "") -> str:
    """sha256 over the header's JSON text and (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256(meta_text.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], key: str, meta: dict,
                 fault_point: str | None = None) -> Path:
    """Write `tensors` (made contiguous, on the CPU) with `meta` as JSON under header key `key`, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {key: json.dumps(meta)}
    header[CHECKSUM_KEY] = tensors_checksum(tensors, _meta_text(header))
    atomic_write_bytes(Path(path), st_save(tensors, metadata=header), fault_point=fault_point)
    return Path(path)


def _meta_text(header: dict) -> str:
    """What the checksum covers of the header: every entry but the checksum, in key order."""
    return "".join(f"{k}={header[k]};" for k in sorted(header) if k != CHECKSUM_KEY)


def _header(data: bytes) -> dict:
    """The safetensors header's metadata: an 8-byte little-endian length, then that much JSON."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("the header runs past the end of the file (truncated?)")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("the header's metadata is not a mapping")
    return meta


def read_meta(path: Path, key: str, what: str = "file") -> dict:
    """Only the JSON under `key` in the header (the tensors are not read or verified)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            meta = _header(head + f.read(min(n, 100 << 20)))
        return json.loads(meta[key])
    except FileNotFoundError:
        raise TensorFileError(f"{path}: no such {what}") from None
    except KeyError:
        raise TensorFileError(f"{path}: not a {what} written by cnnlab (no '{key}' in its header)") from None
    except (OSError, ValueError, struct.error) as e:
        raise TensorFileError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None


def load_tensors(path: Path, key: str | None, what: str = "file") -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, the JSON under `key`) of a file written by save_tensors, its checksum verified.

    key=None: any safetensors file (meta None); verified when it carries a cnnlab checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
        header = _header(data)
        tensors = st_load(data)
        meta = json.loads(header[key]) if key is not None else None
    except FileNotFoundError:
        raise TensorFileError(f"{path}: no such {what}") from None
    except KeyError:
        raise TensorFileError(f"{path}: not a {what} written by cnnlab (no '{key}' in its header)") from None
    except Exception as e:  # safetensors' own errors, JSON errors, short files, I/O errors
        raise TensorFileError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); it is truncated or "
                              "damaged") from None
    expected = header.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors, _meta_text(header)) != expected:
        raise TensorFileError(f"{path}: damaged {what}: its tensors no longer match the checksum written with "
                              "them (a changed byte, e.g. a disk or copy error)")
    return tensors, meta
