"""Int4 by construction: the grid is recovered exactly, trained through Olive (qscale), and written
into the onnxruntime-genai folder bit for bit (offset form and float zero points)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ftl import manifest, metrics
from ftl.errors import AdapterMismatchError, ConfigError
from ftl.export import ExportConfig, export_onnx
from ftl.export.exact import modules_of, read_grid
from ftl.finetune import FinetuneConfig, finetune
from ftl.quant import qscale
from ftl.quant.grid import BLOCK, Grid, grid_of, load_scales, quantize, recover, recover_q8
from tiny import build_tiny_llama


def _random_grid(n: int, k: int, seed: int = 0) -> Grid:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    codes.view(n, k // BLOCK, BLOCK)[..., 0] = 0  # Q4_1 puts the block's minimum at code 0 …
    codes.view(n, k // BLOCK, BLOCK)[..., 1] = 15  # … and its maximum at code 15
    scale = (torch.rand(n, k // BLOCK, generator=g) * 0.01 + 1e-3).half()
    minimum = (-torch.rand(n, k // BLOCK, generator=g) * 0.08).half()
    return Grid(codes, scale, minimum)


def test_a_q4_1_grid_is_recovered_bit_for_bit_and_other_weights_are_not_mistaken_for_one():
    grid = _random_grid(48, 96)
    found = recover(grid.dequantize())
    assert found is not None
    assert torch.equal(found.codes, grid.codes) and torch.equal(found.scale, grid.scale)
    assert torch.equal(found.minimum, grid.minimum)
    noise = torch.randn(48, 96)
    assert recover(noise) is None
    rounded, exact = grid_of(noise)
    assert not exact
    step = rounded.scale.float().repeat_interleave(BLOCK, dim=1)
    assert ((rounded.dequantize() - noise).abs() <= step / 2 + 1e-6).all()  # round-to-nearest: within half a step


@pytest.mark.parametrize("chunk", [1 << 21, 3 * 64])  # the whole matrix at once; 3 rows at a time, the last short
def test_a_q8_0_head_is_recovered_exactly(monkeypatch, chunk):
    from ftl.quant import grid

    monkeypatch.setattr(grid, "RECOVER_CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (40, 64), generator=g).float()
    q.view(40, 2, BLOCK)[..., 0] = 127
    scale = (torch.rand(40, 2, generator=g) * 0.01 + 1e-3).half()
    weight = (scale.float()[..., None] * q.view(40, 2, BLOCK)).view(40, 64)
    found = recover_q8(weight)
    assert found is not None and torch.equal(found.dequantize(), weight)
    assert recover_q8(torch.randn(40, 64)) is None
    off = weight.clone()
    off[-1, -1] += 1e-4  # one value off the grid, in the last chunk
    assert recover_q8(off) is None


@pytest.fixture(scope="module")
def grid_model(tmp_path_factory):
    """A tiny Llama whose projections lie exactly on a Q4_1 grid and whose tied embedding is Q8_0,
    as a GGUF import's do."""
    from safetensors.torch import load_file, save_file

    folder = build_tiny_llama(tmp_path_factory.mktemp("grid") / "tiny-grid", hidden_size=64)
    state = load_file(str(folder / "model.safetensors"))
    for name, weight in state.items():
        if weight.dim() == 2 and name.split(".")[-2].endswith("proj"):
            state[name] = quantize(weight).dequantize()
        elif name.endswith("embed_tokens.weight"):
            blocks = weight.view(weight.shape[0], -1, BLOCK)
            scale = (blocks.abs().max(-1).values / 127).half().float()[..., None]
            safe = torch.where(scale > 0, scale, 1.0)  # the pad token's row is all zeros
            state[name] = (scale * (blocks / safe).round()).view_as(weight)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _ppl(logits_and_ids):
    return metrics.perplexity([metrics.token_nll(logits, ids) for logits, ids in logits_and_ids])


def _onnx_vs_torch(folder, torch_model, sequences):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    onnx = [(metrics.onnx_logits(model, ids), ids) for ids in sequences]
    ref = [(metrics.torch_logits(torch_model, ids), ids) for ids in sequences]
    return _ppl(onnx), _ppl(ref), onnx, ref


SEQUENCES = [[5, 17, 42, 99, 7, 64, 3, 250, 11, 8, 301, 77], [100, 200, 300, 400, 12, 13, 14, 15, 16]]


def test_the_exact_export_holds_the_model_grid_bit_for_bit(grid_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exact"
    export_onnx(ExportConfig(model=str(grid_model), output=out))
    record = manifest.read(out)
    assert record["outputs"]["int4_grid"]["source"] == "gguf"  # recovered, not re-rounded
    assert record["outputs"]["int4_grid"]["exact_head"] is True
    state = load_file(str(grid_model / "model.safetensors"))
    written = read_grid(out)
    assert written, "no int4 MatMuls read back"
    assert any("gate_up_proj" in node for node in written)  # one MatMulNBits for both, as og packs q/k/v
    for node, got in written.items():
        grids = [recover(state[f"{module}.weight"]) for module in modules_of(node)]
        codes = torch.cat([g.codes for g in grids]).numpy()
        scale = torch.cat([g.scale for g in grids]).float().numpy()
        minimum = torch.cat([g.minimum for g in grids]).float().numpy()
        assert np.array_equal(got["codes"], codes), node
        assert np.array_equal(got["scale"], scale), node
        # The float minimum is the integer zero point's offset put back: exact in fp32.
        assert np.array_equal(got["offset"] - got["zero_point"] * got["scale"], minimum), node
    torch_model = AutoModelForCausalLM.from_pretrained(grid_model, dtype=torch.float32).eval()
    onnx_ppl, torch_ppl, onnx, ref = _onnx_vs_torch(out, torch_model, SEQUENCES)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.005
    builder = tmp_path / "builder"
    export_onnx(ExportConfig(model=str(grid_model), output=builder, grid="builder"))
    assert manifest.read(builder)["outputs"]["int4_grid"] is None
    assert read_grid(builder)[node]["offset"] is None


def test_float_zero_points_hold_the_same_grid(grid_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fzp"
    export_onnx(ExportConfig(model=str(grid_model), output=out, grid_form="float-zp"))
    for got in read_grid(out).values():
        assert got["offset"] is None and got["zero_point"].dtype == np.float32
    torch_model = AutoModelForCausalLM.from_pretrained(grid_model, dtype=torch.float32).eval()
    onnx_ppl, torch_ppl, _, _ = _onnx_vs_torch(out, torch_model, SEQUENCES)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.005


def _matmul_nbits(x: np.ndarray, codes, scale, zp) -> np.ndarray:
    """One onnxruntime MatMulNBits (4 bits, float zero points) over x: what the exported graph computes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ftl.export.exact import _pack

    n, k = codes.shape
    inits = [numpy_helper.from_array(_pack(codes.reshape(n, k // BLOCK, BLOCK)), "w"),
             numpy_helper.from_array(scale.reshape(-1), "s"), numpy_helper.from_array(zp.reshape(-1), "z")]
    node = helper.make_node("MatMulNBits", ["x", "w", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=BLOCK)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_float_zero_points_keep_constant_blocks_and_negative_scales():
    """A constant Q4_1 block (scale 0) is its minimum, and a trained scale may turn negative: the float
    zero-point form keeps both (it used to write 0 for such blocks, dropping the minimum)."""
    from ftl.export.exact import float_zero_points

    grid = _random_grid(8, 64, seed=3)
    grid.scale[0, 0], grid.minimum[0, 0] = 0.0, 0.0625  # constant block: every weight is the minimum
    grid.scale[1, 1] = -grid.scale[1, 1]  # a trained negative scale
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).numpy()
    got = _matmul_nbits(x, *float_zero_points(grid))
    want = x @ grid.dequantize().numpy().T
    assert np.allclose(got, want, rtol=1e-4, atol=1e-5), np.abs(got - want).max()


@pytest.fixture(scope="module")
def qscale_run(tmp_path_factory, grid_model, qa_file):
    out = tmp_path_factory.mktemp("qscale") / "ft"
    result = finetune(FinetuneConfig(model=str(grid_model), data=qa_file, output=out, method="qscale", max_steps=6,
                                     batch_size=2, learning_rate=1e-3, save_steps=3))
    return out, result


def test_qscale_trains_only_the_scales_through_olive(qscale_run, grid_model):
    out, result = qscale_run
    record = manifest.read(out)
    assert record["status"] == "complete" and record["params"]["method"] == "qscale"
    assert record["outputs"]["qscale"] == "qscale.safetensors"
    workflow = json.loads((out / "olive_config.json").read_text())
    assert [p["type"] for p in workflow["passes"].values()] == ["FtlQScale"]
    assert len(result.loss_curve) == 6 and all(np.isfinite(p["loss"]) for p in result.loss_curve)
    trained, metadata = load_scales(out / "qscale.safetensors")
    assert metadata["form"] == "float-min" and metadata["grid"] == "exact"
    assert int(metadata["answer_tokens"]) > 0
    from safetensors.torch import load_file

    state = load_file(str(grid_model / "model.safetensors"))
    moved = 0
    for name, parts in trained.items():
        base = recover(state[f"{name}.weight"])
        assert parts["scale"].dtype == torch.float16 and parts["scale"].shape == base.scale.shape
        moved += int((parts["scale"] != base.scale).sum()) + int((parts["minimum"] != base.minimum).sum())
    assert moved > 0  # it trained
    assert not (out / "adapter").exists() and not (out / "olive-output").exists()


def test_a_qscale_fine_tune_exports_exactly_and_matches_its_pytorch_model(qscale_run, grid_model, tmp_path):
    out, _ = qscale_run
    export = tmp_path / "export"
    result = export_onnx(ExportConfig(adapter=out, output=export))
    assert not result.warnings
    record = manifest.read(export)
    assert record["outputs"]["int4_grid"]["source"] == "qscale"
    assert record["inputs"]["adapter"]["sha256"] == manifest.sha256_file(out / "qscale.safetensors")
    trained, _ = load_scales(out / "qscale.safetensors")
    got = read_grid(export)["/model/layers.0/attn/o_proj/MatMul_Q4"]
    assert np.array_equal(got["scale"], trained["model.layers.0.self_attn.o_proj"]["scale"].float().numpy())
    assert np.array_equal(got["offset"] - got["zero_point"] * got["scale"],
                          trained["model.layers.0.self_attn.o_proj"]["minimum"].float().numpy())
    torch_model = qscale.load_model(grid_model, out / "qscale.safetensors")
    onnx_ppl, torch_ppl, _, _ = _onnx_vs_torch(export, torch_model, SEQUENCES)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.005
    # ftl eval finds the PyTorch model an export came from through the manifest.
    from ftl.eval.models import load

    torch_eval = load(f"torch:{out}")
    assert torch_eval.lineage["adapter"] == load(f"onnx:{export}").lineage["adapter"]


def test_a_qscale_fine_tune_is_never_re_quantised(qscale_run, tmp_path):
    out, _ = qscale_run
    with pytest.raises(ConfigError, match="re-quantise"):
        export_onnx(ExportConfig(adapter=out, output=tmp_path / "b", grid="builder"))
    with pytest.raises(ConfigError, match="block"):
        export_onnx(ExportConfig(adapter=out, output=tmp_path / "c", block_size=64))
    with pytest.raises(ConfigError, match="blocks of 32"):
        export_onnx(ExportConfig(model="x", output=tmp_path / "d", grid="exact", block_size=64))


def test_a_qscale_fine_tune_from_another_base_is_refused(qscale_run, tmp_path):
    out, _ = qscale_run
    other = build_tiny_llama(tmp_path / "other", seed=7)
    with pytest.raises(AdapterMismatchError, match="trained on"):
        export_onnx(ExportConfig(adapter=out, model=str(other), output=tmp_path / "e"))


def test_a_lora_export_says_how_much_int4_rounds_away(tiny_finetune, tmp_path):
    # The tiny model is random fp32: no grid of its own, so the default is og's builder; asked for,
    # the exact grid is round-to-nearest and the merged LoRA is put on it.
    assert manifest.read(tmp_path / "lora")["outputs"]["int4_grid"] is None if export_onnx(
        ExportConfig(adapter=tiny_finetune, output=tmp_path / "lora")) else False
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "lora2", grid="exact"))
    assert any("rounds away" in w and "--method qscale" in w for w in result.warnings)
    grid = manifest.read(tmp_path / "lora2")["outputs"]["int4_grid"]
    assert grid["source"] == "round-to-nearest" and 0 <= grid["lora_delta_rounded_away"] <= 1


def test_an_interrupted_qscale_run_resumes_where_it_stopped(grid_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(grid_model)
    prepared = tmp_path / "rows.jsonl"
    prepared.write_text("".join(json.dumps({"text": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n"
                                                    f"answer number {i}<|im_end|>\n",
                                            "prompt": f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n"})
                                + "\n" for i in range(6)))
    rows = qscale.tokenize_rows(tokenizer, prepared)
    assert all(0 < p < len(i) for i, p in zip(rows.ids, rows.prompt_lengths))  # answer-only: prompt masked
    settings = qscale.TrainSettings(steps=4, batch_size=2, learning_rate=1e-3, save_steps=2)

    def fresh():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(grid_model, dtype=torch.float32)
        qscale.attach(model)
        return model

    straight = qscale.train(fresh(), rows, settings, pad_id=tokenizer.pad_token_id)

    def stop_after_three(point):
        if point["step"] == 3:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        qscale.train(fresh(), rows, settings, pad_id=tokenizer.pad_token_id, checkpoint=checkpoint,
                     on_log=stop_after_three)
    resumed = qscale.train(fresh(), rows, settings, pad_id=tokenizer.pad_token_id, checkpoint=checkpoint)
    assert resumed.resumed_at == 2
    for name, grid in straight.grids.items():
        assert torch.allclose(grid.scale.float(), resumed.grids[name].scale.float(), atol=1e-3), name


def test_search_defaults_are_measured_on_held_out_rows_and_written_for_every_og_client(tiny_finetune, qa_file,
                                                                                     tmp_path):
    from ftl.export.search import CANDIDATES

    out = tmp_path / "tuned"
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=out, validation_data=qa_file,
                                      validation_limit=3))
    tuned = manifest.read(out)["outputs"]["search_defaults"]
    assert result.search_defaults == tuned and tuned["rows"] == 3
    assert [t["name"] for t in tuned["trials"]] == list(CANDIDATES)
    chosen = [t for t in tuned["trials"] if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["name"] == tuned["chosen"]
    # That the settings reach og is checked deterministically by test_search_options_reach_onnxruntime_genai
    # (whether the tiny model repeats itself on these rows depends on the session's adapter).
    best = max(t["rouge_l"] for t in tuned["trials"])
    assert chosen[0]["rouge_l"] >= best - 0.01
    search = json.loads((out / "genai_config.json").read_text())["search"]
    assert {k: search[k] for k in tuned["search"]} == tuned["search"]


def test_held_out_rows_that_do_not_parse_are_refused_before_anything_runs(tiny_finetune, tmp_path):
    from ftl.errors import DataError

    bad = tmp_path / "held.jsonl"
    bad.write_text('{"Question": "a", "Answer": "b"}\n{"Question": "c"\n')
    with pytest.raises(DataError, match="held.jsonl:2"):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "x", validation_data=bad))
    assert not (tmp_path / "x").exists()


def test_max_ppl_increase_keeps_the_smallest_export_within_budget(tiny_finetune, qa_file, tmp_path):
    with pytest.raises(ConfigError, match="held-out rows"):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "none", max_ppl_increase="3%"))
    with pytest.raises(ValueError, match="percentage"):
        ExportConfig(adapter=tiny_finetune, output=tmp_path / "bad", max_ppl_increase="three")
    out = tmp_path / "budget"
    result = export_onnx(ExportConfig(adapter=tiny_finetune, output=out, validation_data=qa_file,
                                      validation_limit=3, max_ppl_increase="90%"))
    trials = manifest.read(out)["outputs"]["trials"]
    assert result.trials == trials and trials["max_ppl_increase"] == pytest.approx(0.9)
    # Smallest first. Block 128 does not divide the tiny model's width of 64, so it is not tried;
    # a candidate the builder cannot build is recorded and skipped.
    names = [t["name"] for t in trials["trials"]]
    assert names[0] == "int4 head, block 64" and "int4 head, block 128" not in names
    kept = [t for t in trials["trials"] if t["kept"]]
    assert len(kept) == 1 and kept[0]["within"] and kept[0] == trials["trials"][-1]
    assert all("error" in t for t in trials["trials"][:-1])
    assert manifest.read(out)["outputs"]["layout"]["block_size"] == kept[0]["block_size"]
    assert not (out / ".trials").exists() and (out / "model.onnx").is_file()
    # An ordinary export folder: og opens it.
    from ftl.generate import OnnxChatModel

    assert OnnxChatModel(out).ask("What is the capital of France?", max_new_tokens=4).new_tokens > 0


def test_a_block_size_the_model_cannot_take_is_refused_in_one_line(tiny_finetune, tmp_path):
    with pytest.raises(ConfigError, match="--block-size 128 does not divide the model's hidden size 64"):
        export_onnx(ExportConfig(adapter=tiny_finetune, output=tmp_path / "x", block_size=128, grid="builder"))


def test_search_options_reach_onnxruntime_genai(tiny_export):
    """A search setting passed as a dict (the export's trials) or as a flag changes what og does:
    with no_repeat_ngram_size 1 no token comes twice."""
    from ftl.generate import OnnxChatModel

    model = OnnxChatModel(tiny_export)
    messages = model.format.conversation("What is the capital of France?")
    for kwargs in ({"search": {"no_repeat_ngram_size": 1}}, {"no_repeat_ngram_size": 1}):
        ids = model.generate(messages, max_new_tokens=40, **kwargs).token_ids
        assert len(ids) > 5 and len(set(ids)) == len(ids), kwargs
    # An explicit flag wins over the dict; None leaves it alone.
    ids = model.generate(messages, max_new_tokens=40, search={"no_repeat_ngram_size": 1},
                         no_repeat_ngram_size=None).token_ids
    assert len(set(ids)) == len(ids)


def _gguf_like(kind: str, n: int, k: int, seed: int) -> Grid:
    """A random grid of GGUF type ``kind`` in the form ftl.quant.gguf_grid reads it: K-quant scales are
    fp16 d times a 6-bit (Q6_K: signed 8-bit) sub-block scale, exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    bits = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}[kind]
    block = 16 if kind == "Q6_K" else BLOCK
    codes = torch.randint(0, 1 << bits, (n, k), generator=g).to(torch.uint8)
    shape = (n, k // block)
    d = (torch.rand(shape, generator=g) * 0.01 + 1e-3).half()
    if kind.endswith("_K"):
        sub = torch.randint(-128, 128, shape, generator=g) if kind == "Q6_K" else torch.randint(0, 64, shape, generator=g)
        scale = d.float() * sub.float()
    else:
        scale = d
    if kind in ("Q4_0", "Q5_0", "Q6_K", "Q8_0"):
        zp = torch.full(shape, {4: 8, 5: 16, 6: 32, 8: 128}[bits], dtype=torch.uint8)
        return Grid(codes, scale, None, zp, bits=bits, block=block, kind=kind)
    if kind.endswith("_K"):
        minimum = -((torch.rand(shape, generator=g) * 0.01).half().float() * torch.randint(0, 64, shape, generator=g))
    else:
        minimum = (-torch.rand(shape, generator=g) * 0.08).half()
    return Grid(codes, scale, minimum, bits=bits, block=block, kind=kind)


# Per layer, each projection's GGUF type: packed q/k/v of mixed widths and blocks (Gemma 3's Q4_K_M mixes
# Q4_K, Q5_0, Q6_K and Q8_0), and one of each other type.
MIXED = [{"q_proj": "Q4_K", "k_proj": "Q5_0", "v_proj": "Q8_0", "o_proj": "Q6_K", "gate_proj": "Q4_0",
          "up_proj": "Q5_K", "down_proj": "Q6_K"},
         {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q5_1", "gate_proj": "Q4_1",
          "up_proj": "Q8_0", "down_proj": "Q4_K"}]


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    """A tiny Llama whose projections lie on grids of every GGUF type, with the grid file a GGUF import
    writes beside its weights."""
    from safetensors.torch import load_file, save_file

    from ftl.quant.gguf_grid import GRID_FILE, save_grids

    folder = build_tiny_llama(tmp_path_factory.mktemp("mixed") / "tiny-mixed", hidden_size=64)
    state = load_file(str(folder / "model.safetensors"))
    grids = {}
    for layer, kinds in enumerate(MIXED):
        for proj, kind in kinds.items():
            parent = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{parent}.{proj}"
            n, k = state[f"{name}.weight"].shape
            grids[name] = _gguf_like(kind, n, k, seed=layer * 10 + len(grids))
            state[f"{name}.weight"] = grids[name].dequantize()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_grids(folder / GRID_FILE, grids, {})
    return folder, grids


def test_every_gguf_grid_is_written_exactly_in_a_matmulnbits_form(mixed_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftl.export.exact import modules_of

    folder, grids = mixed_model
    out = tmp_path / "mixed"
    export_onnx(ExportConfig(model=str(folder), output=out))  # the grid file makes exact the default
    record = manifest.read(out)["outputs"]["int4_grid"]
    assert record["source"] == "gguf" and record["eight_bit_matrices"] > 0
    written = read_grid(out)
    # qkv (og packs them), o, gate, up, down per layer; gate and up as one where their grids share a form
    same = sum(1 for i in range(2) if len({(grids[f"model.layers.{i}.mlp.{p}_proj"].bits <= 4,
                                            grids[f"model.layers.{i}.mlp.{p}_proj"].block) for p in ("gate", "up")}) == 1)
    assert record["gate_up_packed"] == same and len(written) == 2 * 5 - same
    for node, got in written.items():
        parts = [grids[m] for m in modules_of(node)]
        wide = any(p.bits > 4 for p in parts) or any(p.block < BLOCK for p in parts)
        assert (got["bits"], got["block"]) == ((8 if wide else 4), min(p.block for p in parts)), node
        rebuilt = (got["codes"].reshape(got["codes"].shape[0], -1, got["block"]) - got["zero_point"][..., None]) \
            * got["scale"][..., None]
        if got["offset"] is not None:
            rebuilt = rebuilt + got["offset"][..., None]
        want = torch.cat([p.dequantize() for p in parts]).numpy()
        rebuilt = rebuilt.reshape(want.shape)
        if all(p.zero_point is not None for p in parts):  # integer zero points: nothing is rounded anywhere
            assert got["offset"] is None and np.array_equal(rebuilt, want), node
        else:  # a float minimum is an fp32 offset: within an ulp of the weight
            assert np.allclose(rebuilt, want, rtol=0, atol=np.abs(want).max() * 2e-7), node
    torch_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    onnx_ppl, torch_ppl, _, _ = _onnx_vs_torch(out, torch_model, SEQUENCES)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.005, (onnx_ppl, torch_ppl)


def test_qscale_trains_every_gguf_grid_and_exports_it_exactly(mixed_model, qa_file, tmp_path):
    folder, grids = mixed_model
    out = tmp_path / "ft"
    finetune(FinetuneConfig(model=str(folder), data=qa_file, output=out, method="qscale", max_steps=3,
                            batch_size=2, learning_rate=1e-3, save_steps=3))
    trained, metadata = load_scales(out / "qscale.safetensors")
    assert metadata["grid"] == "exact"
    for name, parts in trained.items():
        grid = grids[name]
        assert parts["scale"].dtype == grid.scale.dtype and parts["scale"].shape == grid.scale.shape, name
        assert ("zero_point" in parts) == (grid.zero_point is not None), name
        assert not torch.equal(parts["scale"], grid.scale), f"{name} ({grid.kind}) did not train"
    export = tmp_path / "export"
    export_onnx(ExportConfig(adapter=out, output=export))
    assert manifest.read(export)["outputs"]["int4_grid"]["source"] == "qscale"
    torch_model = qscale.load_model(folder, out / "qscale.safetensors")
    onnx_ppl, torch_ppl, _, _ = _onnx_vs_torch(export, torch_model, SEQUENCES)
    assert abs(onnx_ppl / torch_ppl - 1) < 0.005, (onnx_ppl, torch_ppl)


def test_a_matrix_without_a_grid_is_left_to_the_builder_and_named(mixed_model, tmp_path):
    """A GGUF type ftl cannot read (Q2_K, IQ*) leaves its matrix without a grid at import: the export
    lets og's quantiser take that one, keeps every other grid exactly, and says so in one line."""
    import shutil

    from ftl.quant.gguf_grid import GRID_FILE, save_grids

    folder, grids = mixed_model
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    missing = "model.layers.1.mlp.down_proj"
    save_grids(partial / GRID_FILE, {k: v for k, v in grids.items() if k != missing}, {})
    result = export_onnx(ExportConfig(model=str(partial), output=tmp_path / "out"))
    record = manifest.read(tmp_path / "out")["outputs"]["int4_grid"]
    assert record["left_to_builder"] == [missing]
    assert [w for w in result.warnings if missing in w and "og's" in w]
    written = read_grid(tmp_path / "out")
    down = next(node for node in written if "layers.1" in node and "down_proj" in node)
    assert written[down]["bits"] == 4  # the builder's int4, not the 8-bit exact form
    kept = next(node for node in written if "layers.0" in node and "down_proj" in node)
    assert written[kept]["bits"] == 8 and written[kept]["block"] == 16  # layer 0's Q6_K, exactly


@pytest.mark.parametrize("kind", ["Q4_1", "Q6_K"])
def test_grid_linear_gradients_are_autograds_without_keeping_the_weight(kind):
    """qscale's GridLinear rebuilds its weight in backward instead of saving it (issue 26: 8 bytes a
    weight of peak memory): the output and the gradients of the input, scales and minimums are what
    autograd of the same weight gives."""
    from ftl.quant.qscale import GridLinear, _grid_weight

    grid = _gguf_like(kind, 48, 96, seed=3)
    layer = GridLinear(grid, None)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    got = [x.grad.clone(), layer.scale.grad.clone(), None if layer.minimum is None else layer.minimum.grad.clone()]

    x.grad = None
    scale = layer.scale.detach().clone().requires_grad_()
    minimum = None if layer.minimum is None else layer.minimum.detach().clone().requires_grad_()
    reference = torch.nn.functional.linear(x, _grid_weight(layer.codes, scale, minimum, layer.zero_point))
    assert torch.equal(out, reference)
    (reference * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    want = [x.grad, scale.grad, None if minimum is None else minimum.grad]
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_exact_export_records_what_its_offsets_cost_and_buy(grid_model, qa_file, tmp_path):
    """Measured on the folder itself: the exact grid against the same folder without its offsets
    (integer zero points, the builder's node count), timed side by side and scored on held-out rows."""
    from ftl.export.trade import TWIN, has_offsets, without_offsets

    out = tmp_path / "exact"
    result = export_onnx(ExportConfig(model=str(grid_model), output=out, validation_data=qa_file, validation_limit=4))
    trade = manifest.read(out)["outputs"]["exact_trade"]
    assert result.trade == trade and trade["decode_vs_integer_zero_points"] > 0 and len(trade["rounds"]) == 3
    assert trade["rows"] == 4 and trade["ppl_exact"] != trade["ppl_integer_zero_points"]  # the offsets count
    assert not (out / TWIN).exists()
    twin = without_offsets(out, tmp_path / "twin")
    assert has_offsets(out) and not has_offsets(twin)
    written, rounded = read_grid(out), read_grid(twin)
    assert set(written) == set(rounded)
    for node, got in written.items():  # the same MatMulNBits, only the offsets gone
        assert np.array_equal(got["codes"], rounded[node]["codes"]) and rounded[node]["offset"] is None
    builder = tmp_path / "builder"
    assert export_onnx(ExportConfig(model=str(grid_model), output=builder, grid="builder")).trade is None


def test_max_decode_cost_exports_a_models_own_grid_with_the_builder_when_exactness_is_too_slow(
        grid_model, qscale_run, monkeypatch, tmp_path):
    """The decision follows the recorded measurement: here the measured decode ratio is replaced by
    0.5 (a timing is never asserted), the cost 50% is over a 20% budget."""
    from ftl.export import trade

    real = trade.measure

    def halved(folder, rows=None, **kw):
        return {**real(folder, rows, rounds=1), "decode_vs_integer_zero_points": 0.5}

    monkeypatch.setattr(trade, "measure", halved)
    out = tmp_path / "budget"
    result = export_onnx(ExportConfig(model=str(grid_model), output=out, max_decode_cost="20%"))
    record = manifest.read(out)
    assert record["outputs"]["int4_grid"] is None and record["params"]["grid"] == "builder"  # og's quantiser
    assert "over --max-decode-cost 20%" in record["outputs"]["exact_trade"]["rejected"]
    assert any("--max-decode-cost" in w for w in result.warnings + record["warnings"])
    again = export_onnx(ExportConfig(model=str(grid_model), output=out, max_decode_cost="20%"))
    assert again.skipped  # the manifest keeps the command's own fingerprint
    ft, _ = qscale_run  # a qscale fine-tune is its grid: kept, with a warning
    kept = export_onnx(ExportConfig(adapter=ft, output=tmp_path / "qscale", max_decode_cost="20%"))
    assert manifest.read(tmp_path / "qscale")["outputs"]["int4_grid"]["source"] == "qscale"
    assert any("qscale fine-tune is its grid" in w for w in kept.warnings)
