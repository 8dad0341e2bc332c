"""Every GGUF grid ftl reads: recovered from random blocks bit for bit against gguf-py's own
dequantiser, written to the import's sidecar and read back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Where each type keeps its fp16 fields (d, and dmin or m), from ggml's block structs.
FP16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
               "Q6_K": [208]}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}


def random_blocks(kind: str, rows: int, superblocks: int, seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Random bytes for a [rows, K] matrix of ``kind``, its fp16 fields any finite fp16 value
    (subnormals, negatives and zeros included)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    k = block * superblocks
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, superblocks * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in FP16_FIELDS[kind]:
        halves = rng.integers(0, 1 << 16, blocks.shape[0], dtype=np.uint16).view(np.float16)
        halves = np.where(np.isfinite(halves), halves, np.float16(0.5))
        blocks[:, at:at + 2] = halves.reshape(-1, 1).view(np.uint8)
    return raw, (rows, k)


@pytest.mark.parametrize("kind", list(FP16_FIELDS))
def test_grid_from_gguf_dequantises_as_gguf_does_bit_for_bit(kind):
    import gguf

    from ftl.quant.gguf_grid import grid_from_gguf

    ggml_type = gguf.GGMLQuantizationType[kind]
    for seed in range(3):
        raw, shape = random_blocks(kind, rows=7, superblocks=5, seed=seed)
        expected = torch.from_numpy(gguf.dequantize(raw, ggml_type))
        grid = grid_from_gguf(raw, ggml_type, shape)
        assert grid.kind == kind and grid.bits == BITS[kind] and grid.codes.dtype == torch.uint8
        assert grid.codes.shape == shape and int(grid.codes.max()) < 2 ** grid.bits
        assert grid.scale.shape == (shape[0], shape[1] // grid.block)
        assert torch.isfinite(expected).all()
        assert torch.equal(grid.dequantize(), expected), kind


def test_grids_round_trip_through_the_sidecar_bit_for_bit(tmp_path):
    import gguf

    from ftl.quant.gguf_grid import GRID_FILE, grid_from_gguf, grid_metadata, load_grids, save_grids

    grids = {}
    for seed, kind in enumerate(FP16_FIELDS):
        raw, shape = random_blocks(kind, rows=4, superblocks=3, seed=seed)
        grids[f"model.layers.{seed}.mlp.{kind.lower()}_proj"] = grid_from_gguf(
            raw, gguf.GGMLQuantizationType[kind], shape)
    assert load_grids(tmp_path) == {}
    save_grids(tmp_path / GRID_FILE, grids, {"source": "test"})
    loaded = load_grids(tmp_path)
    assert set(loaded) == set(grids) and grid_metadata(tmp_path)["source"] == "test"
    for name, grid in grids.items():
        back = loaded[name]
        assert (back.bits, back.block, back.kind) == (grid.bits, grid.block, grid.kind)
        for part in ("codes", "scale", "minimum", "zero_point"):
            a, b = getattr(grid, part), getattr(back, part)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, part)
        assert torch.equal(back.dequantize(), grid.dequantize())
    one = next(iter(grids))
    assert list(load_grids(tmp_path, names=[one, "not.there"])) == [one]
    # codes of 4 bits or fewer are stored two to a byte
    from safetensors import safe_open

    with safe_open(str(tmp_path / GRID_FILE), "pt") as handle:
        for name, grid in grids.items():
            stored = handle.get_slice(f"{name}.codes").get_shape()
            assert stored == [grid.codes.shape[0], grid.codes.shape[1] // (2 if grid.bits <= 4 else 1)]

@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q2_K", "Q3_K", "IQ4_NL", "Q8_1"])
def test_a_type_without_a_grid_gives_none(kind):
    import gguf

    from ftl.quant.gguf_grid import grid_from_gguf, supported

    ggml_type = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = np.zeros((2, 8 * size), np.uint8)
    assert grid_from_gguf(raw, ggml_type, (2, 8 * block)) is None and not supported(ggml_type)


def test_permuted_rows_keep_the_grid_exact():
    """transformers reverses llama.cpp's q/k row permutation; the grid follows the same rows."""
    import gguf

    from ftl.quant.gguf_grid import grid_from_gguf, matches, permute_rows

    raw, shape = random_blocks("Q4_K", rows=8, superblocks=2, seed=5)
    weight = torch.from_numpy(gguf.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))
    grid = grid_from_gguf(raw, gguf.GGMLQuantizationType.Q4_K, shape)
    order = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
    assert matches(permute_rows(grid, order), weight[order], chunk_values=shape[1] * 3)
    assert not matches(grid, weight[order])
