"""The grid each quantised matrix of a GGUF file lies on, read from the file bit for bit.

A GGUF stores a matrix as blocks of codes with per-block scales (and minimums): exactly a
:class:`~ftl.quant.grid.Grid`. Read from the file, the grid is the one llama.cpp chose, whatever the
type; found again from the dequantised weights it is only known for Q4_1 (``grid.recover``). The
import writes these grids beside the fp32 weights (``GRID_FILE``) so the export writes the file's
own codes and qscale trains the file's own scales.

The codes come from gguf-py's own dequantiser run on a copy of each block whose scale fields are
set to 1 (and minimums to 0): it returns the integer codes in its element order, so the bit layout
of every type has one home, gguf-py. Scales and minimums are computed with the same float
operations gguf-py performs, so ``Grid.dequantize()`` equals ``gguf.dequantize`` bit for bit:

- Q4_0, Q5_0, Q8_0: w = d·(q − z), d fp16 → integer zero point z = 8, 16, 128 (Q8_0's int8 q + 128).
- Q4_1, Q5_1: w = d·q + m, d and m fp16.
- Q4_K, Q5_K: w = (d·sc)·q − dmin·m on sub-blocks of 32 → scale d·sc and minimum −(dmin·m), fp32
  (x − y and x + (−y) are the same IEEE operation).
- Q6_K: w = (d·sc)·(q − 32) on sub-blocks of 16, sc signed → fp32 scale (may be negative), z = 32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ftl.quant.grid import PROJECTIONS, Grid

GRID_FILE = "gguf_grid.safetensors"
_CHUNK_VALUES = 1 << 24  # codes unpacked at a time: 16M fp32 values (64 MB) in flight

_ONE = np.array(1.0, np.float16).tobytes()
_ZERO = np.array(0.0, np.float16).tobytes()


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)  # [B, 1]


def _k_quant_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: (d·sc, −(dmin·m)) per sub-block of 32, as gguf-py's Q4_K.dequantize_blocks."""
    from gguf.quants import Q4_K

    d, dmin = _fp16(blocks, 0).astype(np.float32), _fp16(blocks, 2).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:4 + Q4_K.K_SCALE_SIZE]))
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q6_k_scales(blocks: np.ndarray) -> tuple[np.ndarray, None]:
    scales = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)
    return _fp16(blocks, 208).astype(np.float32) * scales, None


@dataclass(frozen=True)
class _Format:
    bits: int
    block: int  # inputs sharing a scale (a sub-block for K-quants)
    offset: int | None  # the integer zero point; None: the affine form with a minimum
    unit: tuple[tuple[int, bytes], ...]  # (byte offset, bytes) that make gguf's dequantiser return q − offset
    scales: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # blocks → (scale, minimum)


def _d(blocks):
    return _fp16(blocks, 0), None


def _d_m(blocks):
    return _fp16(blocks, 0), _fp16(blocks, 2)


_K_UNIT = ((0, _ONE), (2, _ZERO), (4, bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])))  # every sc = 1, m = 0
FORMATS = {
    "Q4_0": _Format(4, 32, 8, ((0, _ONE),), _d),
    "Q4_1": _Format(4, 32, None, ((0, _ONE), (2, _ZERO)), _d_m),
    "Q5_0": _Format(5, 32, 16, ((0, _ONE),), _d),
    "Q5_1": _Format(5, 32, None, ((0, _ONE), (2, _ZERO)), _d_m),
    "Q8_0": _Format(8, 32, 128, ((0, _ONE),), _d),
    "Q4_K": _Format(4, 32, None, _K_UNIT, _k_quant_scales),
    "Q5_K": _Format(5, 32, None, _K_UNIT, _k_quant_scales),
    "Q6_K": _Format(6, 16, 32, ((192, bytes([1] * 16)), (208, _ONE)), _q6_k_scales),
}


def _type_name(ggml_type) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(int(ggml_type)).name


def supported(ggml_type) -> bool:
    return _type_name(ggml_type) in FORMATS


def grid_from_gguf(raw: np.ndarray, ggml_type, shape: tuple[int, int]) -> Grid | None:
    """The grid of a GGUF matrix: ``raw`` its bytes (a reader tensor's ``data``), ``shape`` (N, K) =
    (output rows, inputs; GGUF's (ne1, ne0)). None for a type with no grid here (F32/F16/BF16,
    Q2_K, Q3_K, IQ*, …)."""
    from gguf import GGML_QUANT_SIZES, dequantize

    kind = _type_name(ggml_type)
    if kind not in FORMATS or len(shape) != 2:
        return None
    spec = FORMATS[kind]
    n, k = (int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[int(ggml_type)]
    if k % block_size or np.asarray(raw).nbytes != n * k // block_size * type_size:
        return None
    # whole rows at a time: gguf-py dequantises in groups of 16 rows of the array it is given
    matrix = np.asarray(raw).view(np.uint8).reshape(n, k // block_size * type_size)
    codes = np.empty((n, k), np.uint8)
    scales, minimums = [], []
    step = max(1, _CHUNK_VALUES // k)
    for start in range(0, n, step):
        chunk = matrix[start:start + step]
        unit = chunk.copy()
        blocks = unit.reshape(-1, type_size)
        for at, value in spec.unit:
            blocks[:, at:at + len(value)] = np.frombuffer(value, np.uint8)
        codes[start:start + len(chunk)] = dequantize(unit, ggml_type) + (spec.offset or 0)
        scale, minimum = spec.scales(chunk.reshape(-1, type_size))
        scales.append(scale)
        minimums.append(minimum)
    per_row = k // spec.block
    scale = torch.from_numpy(np.concatenate(scales).reshape(n, per_row))
    minimum = None if spec.offset is not None else torch.from_numpy(np.concatenate(minimums).reshape(n, per_row))
    zero_point = None if spec.offset is None else torch.full((n, per_row), spec.offset, dtype=torch.uint8)
    return Grid(torch.from_numpy(codes), scale, minimum, zero_point, spec.bits, spec.block, kind)


def permute_rows(grid: Grid, order: torch.Tensor) -> Grid:
    """The grid of ``weight[order]`` (transformers reverses llama.cpp's q/k row permutation)."""
    pick = (lambda t: None if t is None else t[order].contiguous())
    return Grid(pick(grid.codes), pick(grid.scale), pick(grid.minimum), pick(grid.zero_point), grid.bits, grid.block,
                grid.kind)


def rows(grid: Grid, start: int, stop: int) -> Grid:
    cut = (lambda t: None if t is None else t[start:stop])
    return Grid(cut(grid.codes), cut(grid.scale), cut(grid.minimum), cut(grid.zero_point), grid.bits, grid.block,
                grid.kind)


def matches(grid: Grid, weight: torch.Tensor, chunk_values: int = 1 << 24) -> bool:
    """Whether the grid dequantises to ``weight`` bit for bit (rows at a time: an embedding's
    dequantised copy would cost as much as the embedding)."""
    n, k = grid.codes.shape
    if tuple(weight.shape) != (n, k):
        return False
    step = max(1, chunk_values // k)
    return all(torch.equal(rows(grid, a, a + step).dequantize(), weight[a:a + step]) for a in range(0, n, step))


class GridWriter:
    """The grid sidecar, written one grid at a time (``ftl.tensorfile``): the grids of a large model
    are never all in memory. Codes of 4 bits or fewer are packed two to a byte."""

    def __init__(self, path: Path):
        from ftl.tensorfile import TensorFileWriter

        self._file = TensorFileWriter(path)
        self._layout: dict[str, dict] = {}

    def add(self, name: str, grid: Grid) -> None:
        packed = grid.bits <= 4
        codes = grid.codes[:, 0::2] | (grid.codes[:, 1::2] << 4) if packed else grid.codes
        self._file.add(f"{name}.codes", codes)
        self._file.add(f"{name}.scale", grid.scale)
        if grid.zero_point is not None:
            self._file.add(f"{name}.zero_point", grid.zero_point)
        else:
            self._file.add(f"{name}.minimum", grid.minimum)
        self._layout[name] = {"bits": grid.bits, "block": grid.block, "kind": grid.kind, "packed": packed}

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        return self._file.close({**(metadata or {}), "grids": json.dumps(self._layout, sort_keys=True)})

    def discard(self) -> None:
        self._file.discard()

    def __len__(self) -> int:
        return len(self._layout)


def save_grids(path: Path, grids: dict[str, Grid], metadata: dict[str, str] | None = None) -> Path:
    writer = GridWriter(path)
    try:
        for name, grid in grids.items():
            writer.add(name, grid)
    except BaseException:
        writer.discard()
        raise
    return writer.close(metadata)


def grid_metadata(model_dir: Path) -> dict[str, str]:
    """The sidecar's metadata ({} when there is none); ``"grids"`` holds each grid's bits/block/kind."""
    from safetensors import safe_open

    path = Path(model_dir) / GRID_FILE
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def load_grids(model_dir: Path, names: Iterable[str] | None = None) -> dict[str, Grid]:
    """The grids a GGUF import stored, by HF module name (``model.layers.0.self_attn.q_proj``), codes
    unpacked to uint8 [N, K]; only ``names`` when given. {} when the folder has no grid file."""
    from safetensors import safe_open

    path = Path(model_dir) / GRID_FILE
    if not path.is_file():
        return {}
    found: dict[str, Grid] = {}
    with safe_open(str(path), "pt") as handle:
        layout = json.loads((handle.metadata() or {}).get("grids", "{}"))
        keys = set(handle.keys())
        for name in layout if names is None else [n for n in names if n in layout]:
            spec = layout[name]
            codes = handle.get_tensor(f"{name}.codes")
            if spec["packed"]:
                codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
            part = (lambda p: handle.get_tensor(f"{name}.{p}") if f"{name}.{p}" in keys else None)
            found[name] = Grid(codes, part("scale"), part("minimum"), part("zero_point"), spec["bits"], spec["block"],
                               spec["kind"])
    return found


def projection_grids(model_dir: Path) -> dict[str, Grid]:
    """The grids of the decoder projections (q_proj … down_proj), the ones the export writes and
    qscale trains; the embedding's and an untied head's stay in the file, unread."""
    layout = json.loads(grid_metadata(model_dir).get("grids", "{}"))
    return load_grids(model_dir, [name for name in layout if name.rsplit(".", 1)[-1] in PROJECTIONS])
