"""How ftl drives og's builder so that its memory follows the largest tensor's chunk, not the tensor:
onnxruntime's k-quant runs on a weight 2M values at a time (ftl.export.builder.k_quant_in_chunks)."""

import tracemalloc

import numpy as np
import pytest

from ftl.export import builder


def _weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * 0.02)


@pytest.mark.parametrize("bits", [4, 8])
def test_k_quant_in_chunks_gives_the_same_codes_scales_and_zero_points(monkeypatch, bits):
    from onnxruntime.quantization.neural_compressor import weight_only

    monkeypatch.setattr(builder, "K_QUANT_CHUNK", 3 * 96)  # 3 rows a chunk: 7 chunks, the last one short
    weight = _weight(96, 19)  # [in, out], as rtn_quantize holds it; it passes the transpose
    original = weight_only.quant_tensor_k_quant_cpu
    expected = original(weight.T, bits, 32)
    with builder.k_quant_in_chunks():
        got = weight_only.quant_tensor_k_quant_cuda(weight.T, bits, 32)  # what rtn_quantize calls
    assert weight_only.quant_tensor_k_quant_cpu is original  # put back after the build
    assert np.array_equal(got[0], expected[0].astype(np.uint8))
    assert got[1].dtype == expected[1].dtype and np.array_equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2])


@pytest.mark.parametrize("bits, scheme", [(4, "asym"), (8, "asym"), (4, "sym")])
def test_round_to_nearest_in_chunks_gives_the_same_codes_scales_and_zero_points(monkeypatch, bits, scheme):
    from onnxruntime.quantization.neural_compressor import weight_only

    monkeypatch.setattr(builder, "K_QUANT_CHUNK", 3 * 96)
    weight = _weight(96, 19, seed=1)
    original = weight_only.quant_tensor
    expected = original(weight.T, bits, 32, scheme, "uint")
    with builder.k_quant_in_chunks():
        got = weight_only.quant_tensor(weight.T, bits, 32, scheme, "uint")
    assert weight_only.quant_tensor is original
    assert np.array_equal(got[0], expected[0].astype(np.uint8))
    assert got[1].dtype == expected[1].dtype and np.array_equal(got[1], expected[1])
    assert np.array_equal(got[2], expected[2])


def _peak_bytes(function) -> int:
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_k_quant_of_a_large_weight_peaks_near_its_chunk_not_at_a_dozen_copies(monkeypatch):
    """Llama-3.2-1B's tied int8 head took +9 GiB in one call; the same call in chunks stays near the
    weight's own size (the float32 input a caller holds anyway, plus the uint8 codes)."""
    from onnxruntime.quantization.neural_compressor import weight_only

    monkeypatch.setattr(builder, "K_QUANT_CHUNK", 1 << 16)
    weight = _weight(2048, 1024)  # 2M values, 8 MiB
    whole = _peak_bytes(lambda: weight_only.quant_tensor_k_quant_cuda(weight.T, 8, 32))
    with builder.k_quant_in_chunks():
        chunked = _peak_bytes(lambda: weight_only.quant_tensor_k_quant_cuda(weight.T, 8, 32))
    print(f"peak: whole {whole / weight.nbytes:.1f}x the weight, in chunks {chunked / weight.nbytes:.2f}x")
    assert whole > 5 * weight.nbytes  # the measured problem: many full-size temporaries (8.7x here)
    assert chunked < weight.nbytes


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """The tiny Llama (tied), untied, with 48 inputs (not a multiple of the block: padded), and Gemma 3."""
    from tiny import build_tiny_gemma3, build_tiny_llama

    root = tmp_path_factory.mktemp("variants")
    return {"tied": tiny_model, "untied": build_tiny_llama(root / "untied", tied=False),
            "k48": build_tiny_llama(root / "k48", hidden_size=48), "gemma3": build_tiny_gemma3(root / "gemma3")}


@pytest.mark.parametrize("algo, symmetric, variant, extra", [
    ("k_quant_last", True, "tied", {}), ("k_quant_last", False, "untied", {}), ("rtn_last", True, "tied", {}),
    ("default", True, "tied", {}), ("default", True, "untied", {}), ("rtn", False, "tied", {}),
    ("k_quant_mixed", True, "tied", {}), ("k_quant_last", True, "tied", {"accuracy_level": 4}),
    ("rtn_last", False, "untied", {"op_types_to_quantize": ("Gather",)}),
    ("default", True, "untied", {"op_types_to_quantize": ("MatMul",)}),
    # 48 inputs: only "default" (onnxruntime 1.31's rtn_quantize cannot pack the zero points of 2 blocks a row;
    # og alone raises the same ValueError)
    ("default", True, "k48", {}), ("k_quant_last", False, "gemma3", {}),
    ("default", True, "gemma3", {})])
def test_a_build_is_byte_identical_to_og_alone(models, tmp_path, monkeypatch, algo, symmetric, variant, extra):
    """The folder ftl's build writes (k-quant in chunks, one weight quantised at a time) is the one
    og's builder writes by itself, byte for byte, for every algorithm ftl asks of it."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    model = models[variant]
    tied = variant != "untied"
    monkeypatch.setattr(builder, "K_QUANT_CHUNK", 256)  # the tiny model's weights span many chunks
    calls = []
    per_weight = builder._to_nbits_per_weight
    monkeypatch.setattr(builder, "_to_nbits_per_weight", lambda *a: calls.append(a[2]) or per_weight(*a))
    direct = []  # rtn/k-quant weights quantised straight from og's tensors, without a proto
    rtn_one_weight = builder._rtn_one_weight
    monkeypatch.setattr(builder, "_rtn_one_weight", lambda *a: direct.append(rtn_one_weight(*a)) or direct[-1])
    options = builder.BuildOptions(algo_config=algo, is_symmetric=symmetric, **extra)
    builder.build(model, tmp_path / "ftl", options, cache_dir=tmp_path / "cache")
    assert len(calls) == 1  # ftl's path ran, not og's whole-graph one
    # every MatMul (2 layers: qkv, o, gate, up, down; the head) is rtn's, whatever the op types
    assert all(m is not None for m in direct) and len(direct) == (0 if algo == "default" else 11)
    args = (None, str(model), str(tmp_path / "og"), "int4", "cpu", str(tmp_path / "cache"))
    prepared = parse_extra_options(*args, options.extra_options())
    builder._fit_config(prepared["hf_details"]["hf_config"])
    create_model(*args, **prepared)
    ftl_data = (tmp_path / "ftl" / "model.onnx.data").read_bytes()
    assert ftl_data == (tmp_path / "og" / "model.onnx.data").read_bytes()
    assert (tmp_path / "ftl" / "model.onnx").read_bytes() == (tmp_path / "og" / "model.onnx").read_bytes()
    if not extra and variant != "gemma3":
        layout = builder.read_layout(tmp_path / "ftl")
        assert layout.head_bits == {**builder.HEAD_BITS, "rtn_last": 8}[algo] and layout.tied == tied
