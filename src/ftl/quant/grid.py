"""The int4 grid of a weight matrix: w = minimum + scale·code in every block of 32 inputs.

A model imported from a GGUF Q4_1 file lies exactly on such a grid (``recover`` finds it, checked
bit for bit); any other model gets one by round-to-nearest on the block's range (``quantize``,
what llama.cpp's Q4_1 does). ``qscale`` trains the scales and minimums with the codes fixed, and
the export writes (codes, scale, minimum) exactly, so the int4 model is the model that was trained.

Scales and minimums are fp16, as in GGUF; codes are 0..15; blocks run along the input dimension,
as in onnxruntime's MatMulNBits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

BLOCK = 32
LEVELS = 15
# The decoder projections a grid covers (Llama-style names; the embedding and head are not in it).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARTEFACT = "qscale.safetensors"


@dataclass
class Grid:
    """w = minimum + scale·code per block (GGUF Q4_1, Q4_K, Q5_1, Q5_K), or, with ``zero_point`` set,
    the integer zero-point form w = scale·(code − zero_point) that MatMulNBits computes natively
    (GGUF Q4_0, Q5_0, Q6_K, Q8_0 as code = q + offset).

    ``bits`` is the width of the codes (4 … 8), ``block`` the inputs sharing a scale (32; 16 for
    Q6_K), ``kind`` the GGUF type the grid came from. Scales and minimums are fp16 where the format
    stores them so (Q4_0/1, Q5_0/1, Q8_0); a K-quant's are products d·sc, exact in fp32."""

    codes: torch.Tensor  # uint8 [N, K], 0 … 2**bits − 1
    scale: torch.Tensor  # fp16 or fp32 [N, K/block]
    minimum: torch.Tensor | None  # [N, K/block], as scale; None in the integer zero-point form
    zero_point: torch.Tensor | None = None  # uint8 [N, K/block]
    bits: int = 4
    block: int = BLOCK
    kind: str = "Q4_1"

    def dequantize(self) -> torch.Tensor:
        """fp32 weights [N, K], as GGUF's own dequantiser (or MatMulNBits) computes them."""
        n, k = self.codes.shape
        scale = self.scale.float()[..., None]
        blocks = self.codes.view(n, k // self.block, self.block).float()
        if self.zero_point is not None:
            return (scale * (blocks - self.zero_point.float()[..., None])).view(n, k)
        return (scale * blocks + self.minimum.float()[..., None]).view(n, k)

    def float_minimum(self) -> torch.Tensor:
        """The block minimum in fp32 (−scale·zero_point in the integer form)."""
        if self.zero_point is not None:
            return -self.scale.float() * self.zero_point.float()
        return self.minimum.float()

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def reblocked(self, block: int) -> "Grid":
        """The same weights in smaller blocks (each block's scale, minimum and zero point repeated):
        how a block-32 grid shares one MatMulNBits with a block-16 one."""
        if block == self.block:
            return self
        if self.block % block:
            raise ValueError(f"a block of {self.block} cannot be split into blocks of {block}")
        repeat = self.block // block

        def spread(t):
            return None if t is None else t.repeat_interleave(repeat, dim=1)

        return replace(self, scale=spread(self.scale), minimum=spread(self.minimum),
                       zero_point=spread(self.zero_point), block=block)


def blocks_fit(k: int, block: int = BLOCK) -> bool:
    return k % block == 0


def _codes(blocks: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    d = scale.float()[..., None]
    nonzero = d != 0  # a trained or K-quant (Q6_K) scale may be negative
    raw = torch.where(nonzero, (blocks - minimum.float()[..., None]) / torch.where(nonzero, d, 1.0), 0.0)
    return raw.round().clamp(0, levels).to(torch.uint8)


def recover(weight: torch.Tensor) -> Grid | None:
    """The exact grid a weight lies on, or None when it does not lie on a Q4_1 grid.

    In every Q4_1 block the smallest weight has code 0 and the largest code 15 (llama.cpp sets the
    block's range so), so round-to-nearest on the block's range finds the grid; it is checked bit
    for bit."""
    w = weight.detach().float()
    if not blocks_fit(w.shape[1]):
        return None
    grid = quantize(w)
    if not torch.equal(grid.minimum.float(), w.view(w.shape[0], -1, BLOCK).min(-1).values):
        return None
    return grid if torch.equal(grid.dequantize(), w) else None


def quantize(weight: torch.Tensor) -> Grid:
    """Round-to-nearest onto a Q4_1 grid (block range, fp16 scale and minimum): a start for qscale
    on a model that has no grid yet."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = w.view(n, k // BLOCK, BLOCK)
    low, high = blocks.min(-1).values, blocks.max(-1).values
    minimum, scale = low.half(), ((high - low) / LEVELS).half()
    return Grid(_codes(blocks, scale, minimum).view(n, k), scale, minimum)


def nearest_zero_point(grid: Grid) -> torch.Tensor:
    """The integer zero point nearest to −minimum/scale per block (mid-range for a zero-scale
    block), fp32; the grid's own where it has one."""
    if grid.zero_point is not None:
        return grid.zero_point.float()
    d, m = grid.scale.float(), grid.float_minimum()
    return torch.where(d != 0, (-m / torch.where(d != 0, d, 1.0)).round(),
                       float(1 << (grid.bits - 1))).clamp(0, grid.levels)


def grid_of(weight: torch.Tensor) -> tuple[Grid, bool]:
    """(grid, exact): the weight's own grid when it has one, else a round-to-nearest one."""
    found = recover(weight)
    return (found, True) if found is not None else (quantize(weight), False)


def integer_form(grid: Grid) -> Grid:
    """The nearest integer zero-point grid with the same scales: z = round(−minimum/scale), codes
    re-rounded. What MatMulNBits stores without help; qscale can train from it. A grid that has
    an integer zero point already (Q4_0, Q5_0, Q6_K, Q8_0) is returned as it is."""
    if grid.zero_point is not None:
        return grid
    d, z = grid.scale.float(), nearest_zero_point(grid)
    n, k = grid.codes.shape
    w = grid.dequantize().view(n, k // grid.block, grid.block)
    nonzero = d != 0
    codes = torch.where(nonzero[..., None], w / torch.where(nonzero, d, 1.0)[..., None] + z[..., None], z[..., None])
    codes = codes.round().clamp(0, grid.levels).to(torch.uint8).view(n, k)
    return replace(grid, codes=codes, minimum=None, zero_point=z.to(torch.uint8))


def requantize(weight: torch.Tensor, grid: Grid) -> Grid:
    """Put a changed weight (a merged LoRA) back on a grid's scales and minimums: new codes only."""
    n, k = weight.shape
    blocks = weight.detach().float().view(n, k // grid.block, grid.block)
    codes = _codes(blocks, grid.scale, grid.float_minimum(), grid.levels).view(n, k)
    return replace(grid, codes=codes)


def projection_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder projection weights of a state dict, by module name (without ``.weight``)."""
    return {name[: -len(".weight")]: w for name, w in state.items()
            if name.endswith(".weight") and w.dim() == 2 and name.split(".")[-2] in PROJECTIONS}


def save_scales(path: Path, grids: dict[str, Grid], metadata: dict[str, str]) -> None:
    """The qscale artefact: per projection, a scale and minimum per block (or the integer zero
    point, in that form), in the grid's own precision (fp16 as GGUF keeps Q4_1's; fp32 for a
    K-quant's products). The codes are not in it: they are the base model's."""
    from safetensors.torch import save_file

    tensors = {}
    for name, grid in grids.items():
        tensors[f"{name}.scale"] = grid.scale.detach().contiguous()
        if grid.zero_point is not None:
            tensors[f"{name}.zero_point"] = grid.zero_point.contiguous()
        else:
            tensors[f"{name}.minimum"] = grid.minimum.detach().contiguous()
    save_file(tensors, str(path), metadata=metadata)


def load_scales(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """{projection: {"scale": …, "minimum" or "zero_point": …}} and the artefact's metadata."""
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            name, part = key.rsplit(".", 1)
            found.setdefault(name, {})[part] = handle.get_tensor(key)
    return found, metadata


@dataclass
class Grid8:
    """A GGUF Q8_0 matrix (the embedding and tied head of a Q4_1 file): w = scale·q, q in −127..127."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # fp16 [N, K/32]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.scale.float()[..., None] * self.q.view(n, k // BLOCK, BLOCK).float()).view(n, k)


RECOVER_CHUNK = 1 << 21  # values recovered at once: a vocabulary-sized head takes a few MB at a time


def recover_q8(weight: torch.Tensor) -> Grid8 | None:
    """The exact Q8_0 grid of a weight (scale = block max |w| / 127, in fp16), or None. Recovered a
    few rows at a time: each block is its own, and the whole head at once took 4x its fp32 size in
    temporaries (Gemma 3's 262k × 640: +2.8 GiB)."""
    n, k = weight.shape
    if not blocks_fit(k):
        return None
    q = torch.empty((n, k), dtype=torch.int8)
    scales = torch.empty((n, k // BLOCK), dtype=torch.float16)
    step = max(1, RECOVER_CHUNK // k)
    for start in range(0, n, step):
        w = weight[start:start + step].detach().float()
        blocks = w.view(w.shape[0], k // BLOCK, BLOCK)
        scale = (blocks.abs().max(-1).values / 127).half()
        d = scale.float()[..., None]
        part = Grid8(torch.where(d > 0, blocks / torch.where(d > 0, d, 1.0), 0.0).round().clamp(-127, 127)
                     .to(torch.int8).view(w.shape[0], k), scale)
        if not torch.equal(part.dequantize(), w):
            return None
        q[start:start + step], scales[start:start + step] = part.q, scale
    return Grid8(q, scales)
