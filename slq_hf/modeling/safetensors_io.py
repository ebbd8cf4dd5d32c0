"""The one safetensors writer of SLQ checkpoints: atomic and byte-reproducible.

Ships inside every checkpoint (remote code): torch/safetensors only.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save


def reproducible_safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with the JSON header's keys sorted.

    safetensors serialises its header from a hash map whose order changes between processes, so two saves of the same
    tensors differ byte-wise; sorting makes a checkpoint's hash depend on its content only (uploads, caches and tests
    can compare bytes). Data offsets are absolute, so the data block is unchanged.
    """
    blob = save(state, metadata=metadata)
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + blob[8 + length :]


def atomic_save_file(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``state`` to ``path`` via a temporary file, fsync and rename.

    A crash never leaves a half-written file under the final name, and a failed write leaves the old file untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(reproducible_safetensors_bytes(state, metadata))
            handle.flush()
            # Flushed to disk before the rename, so even a power loss cannot leave the new name on partial data.
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
