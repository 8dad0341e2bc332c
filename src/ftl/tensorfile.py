"""A safetensors file written one tensor at a time.

``safetensors.torch.save_file`` wants every tensor of the file in memory at once: for a model's
shard or a grid sidecar that is the model, not the tensor in hand. Here each tensor's bytes go to a
spool file as they come; ``close`` writes the header (known only then) and appends the spooled
bytes. Memory holds one tensor; the disk is written twice. The file is an ordinary safetensors file
(read by ``safe_open``, transformers, onnxruntime-genai's builder).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "uint8": "U8", "int8": "I8",
          "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL"}


class TensorFileWriter:
    """``add`` tensors, then ``close(metadata)``; ``nbytes`` is the data written so far."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._spool = open(self.path.with_name(self.path.name + ".spool"), "w+b")
        self._header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor) -> None:
        """Append a torch tensor (any layout: it is made contiguous here)."""
        import torch

        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice to {self.path}")
        data = tensor.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
        self._spool.write(memoryview(raw))
        size = data.numel() * data.element_size()
        self._header[name] = {"dtype": DTYPES[str(data.dtype).removeprefix("torch.")], "shape": list(data.shape),
                              "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        partial = self.path.with_name(self.path.name + ".partial")
        try:  # the file appears whole or not at all (a full disk leaves no truncated safetensors behind)
            with open(partial, "wb") as out:
                out.write(struct.pack("<Q", len(text)))
                out.write(text)
                self._spool.seek(0)
                shutil.copyfileobj(self._spool, out, 1 << 24)
            partial.replace(self.path)
        finally:
            partial.unlink(missing_ok=True)
            self.discard()
        return self.path

    def discard(self) -> None:
        """Drop the spool (after ``close``, or when the file is abandoned)."""
        if not self._spool.closed:
            self._spool.close()
        Path(self._spool.name).unlink(missing_ok=True)

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            self.discard()


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a safetensors file, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}



def weight_files(folder: Path) -> list[Path] | None:
    """An HF folder's safetensors weight files (by its index when sharded); None when it has none."""
    import json

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()
        return sorted({folder / name for name in names})
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else None


def weight_summary(files: list[Path]) -> tuple[int, int, int]:
    """Parameters, their bytes as stored, and the largest tensor's parameters, from the headers."""
    import math

    from safetensors import safe_open

    parameters = stored = largest = 0
    for file in files:
        with safe_open(str(file), "np") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                count = math.prod(tensor.get_shape())
                parameters += count
                stored += count * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
                largest = max(largest, count)
    return parameters, stored, largest


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def parameter_count(files: list[Path]) -> int:
    """Parameters in safetensors files, from their headers (a tied head is stored once)."""
    return weight_summary(files)[0]
