"""``ftl export-gguf``: a qscale fine-tune of an imported GGUF model, written back as a GGUF whose
trained blocks read back bit for bit, every other tensor and the metadata as in the source file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ftl import manifest
from ftl.errors import ConfigError, ExportError, OutputExistsError
from ftl.export.gguf_export import FILE, export_gguf, text_template_jinja
from ftl.finetune import FinetuneConfig, finetune
from ftl.models import import_model

HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def write_tiny_gguf(path, seed: int = 0):
    """A 2-layer Llama GGUF (Q4_1 body, Q8_0 tied embedding) with SmolLM2's tokenizer and chat template,
    quantised by gguf-py itself: what llama.cpp's tools write, in miniature."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quantize

    from ftl.models.store import builtin_gguf

    rng = np.random.default_rng(seed)
    source = GGUFReader(builtin_gguf("smollm2-135m"))
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(3)  # MOSTLY_Q4_1
    for name, item in source.fields.items():
        if name.startswith("tokenizer."):
            kind = item.types[0]
            writer.add_key_value(name, item.contents(), kind,
                                 sub_type=item.types[-1] if kind == GGUFValueType.ARRAY else None)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_vocab_size(vocab)

    def add(name, shape, kind):
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        writer.add_tensor(name, values if kind == T.F32 else quantize(values, kind), raw_dtype=kind)

    add("token_embd.weight", (vocab, HIDDEN), T.Q8_0)
    head = HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), T.Q4_1)
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * head, HIDDEN), T.Q4_1)
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head, HIDDEN), T.Q4_1)
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), T.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", (FF, HIDDEN), T.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (FF, HIDDEN), T.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FF), T.Q4_1)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_run(tmp_path_factory, qa_file):
    root = tmp_path_factory.mktemp("gguf")
    imported = import_model(str(write_tiny_gguf(root / "tiny.gguf")), name="tiny-gguf", models_dir=root / "models")
    assert imported.grids == 7 * LAYERS + 1  # and the Q8_0 embedding
    out = root / "ft"
    finetune(FinetuneConfig(model=str(imported.path), data=qa_file, output=out, method="qscale", max_steps=4,
                            batch_size=2, learning_rate=1e-2, save_steps=4))
    return root, imported.path, out


def test_a_qscale_fine_tune_is_written_as_gguf_and_reads_back_bit_for_bit(tiny_gguf_run):
    from gguf import GGUFReader

    from ftl.export.gguf_export import gguf_names
    from ftl.models.gguf_import import _row_order
    from ftl.quant.grid import load_scales
    from ftl.quant.gguf_grid import grid_from_gguf, permute_rows, projection_grids

    root, model_dir, ft = tiny_gguf_run
    result = export_gguf(ft, None, root / "export")
    assert (result.trained, result.chat_template) == (7 * LAYERS, "the source's")
    written, source = GGUFReader(result.file), GGUFReader(root / "tiny.gguf")
    trained, _ = load_scales(ft / "qscale.safetensors")
    base = projection_grids(model_dir)
    names, processor = gguf_names(root / "tiny.gguf", model_dir)
    moved = 0
    for tensor, original in zip(written.tensors, source.tensors):
        assert (tensor.name, tensor.tensor_type) == (original.name, original.tensor_type)
        module = names.get(tensor.name)
        if module not in trained:
            assert bytes(np.asarray(tensor.data).view(np.uint8)) == bytes(np.asarray(original.data).view(np.uint8))
            continue
        shape = tuple(int(s) for s in reversed(tensor.shape))
        grid = grid_from_gguf(tensor.data, tensor.tensor_type, shape)
        order = _row_order(processor, tensor.name, shape[0])
        grid = permute_rows(grid, order)  # the file's rows in transformers' order, as the import read them
        assert torch.equal(grid.codes, base[module].codes)
        assert torch.equal(grid.scale, trained[module]["scale"]) and torch.equal(grid.minimum, trained[module]["minimum"])
        moved += int((grid.scale != base[module].scale).sum())
    assert moved > 0  # the trained scales, not the base's
    for name, item in source.fields.items():
        if not name.startswith("GGUF."):
            assert written.fields[name].contents() == item.contents(), name
    assert written.fields["ftl.source"].contents() == "tiny.gguf"
    record = manifest.read(root / "export")
    assert record["status"] == "complete" and record["inputs"]["adapter"]["sha256"] == \
        manifest.sha256_file(ft / "qscale.safetensors")

    # The file loads in transformers (llama.cpp's reader in Python) as the PyTorch qscale model, exactly.
    from transformers import AutoModelForCausalLM

    from ftl.quant import qscale

    loaded = AutoModelForCausalLM.from_pretrained(root / "export", gguf_file=FILE, dtype="float32")
    ours = qscale.load_model(model_dir, ft / "qscale.safetensors")
    for name, module in ours.named_modules():
        if isinstance(module, qscale.GridLinear):
            assert torch.equal(loaded.get_submodule(name).weight, module.weight()), name

    again = export_gguf(ft, None, root / "export")
    assert again.skipped
    with pytest.raises(OutputExistsError):
        export_gguf(None, str(model_dir), root / "export")


def test_export_gguf_cli_and_its_refusals(tiny_gguf_run, tiny_finetune, tiny_model, tmp_path):
    root, model_dir, ft = tiny_gguf_run
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "ftl", "export-gguf", "--adapter", str(ft), "--output", str(out),
                           "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["trained"] == 7 * LAYERS and (out / FILE).is_file()
    with pytest.raises(ConfigError, match="LoRA"):
        export_gguf(tiny_finetune, None, tmp_path / "lora")
    with pytest.raises(ConfigError, match="not imported from a GGUF"):
        export_gguf(None, str(tiny_model), tmp_path / "hf")
    assert not (tmp_path / "lora").exists() and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_encode_writes_gguf_py_s_own_blocks(kind):
    """A grid read from gguf-py's blocks and encoded again gives those bytes back, for every type written."""
    from gguf import GGMLQuantizationType, quantize

    from ftl.export.gguf_export import encode
    from ftl.quant.gguf_grid import grid_from_gguf

    weight = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    blocks = quantize(weight, GGMLQuantizationType[kind])
    grid = grid_from_gguf(blocks, GGMLQuantizationType[kind], (6, 96))
    assert grid.kind == kind and np.array_equal(encode(grid), blocks)


def test_a_grid_gguf_cannot_store_is_refused_before_anything_is_written():
    from ftl.export.gguf_export import encode, storable
    from ftl.quant.grid import quantize

    grid = quantize(torch.randn(8, 64))
    assert storable(grid) is None and encode(grid).shape == (8, 2 * 20)
    k_quant = type(grid)(grid.codes, grid.scale.float(), grid.minimum.float(), kind="Q4_K")
    with pytest.raises(ExportError, match="cannot be stored exactly as GGUF"):
        encode(k_quant)


def test_a_text_template_becomes_a_jinja_chat_template_that_renders_the_same():
    from jinja2 import Environment

    from ftl.chat import PromptFormat

    fmt = PromptFormat(kind="text", text_template="### Q {{x}}: {Question}\n### A: {Answer}", system_prompt="Be brief.",
                       special_tokens={"eos_token": "</s>", "bos_token": "<s>"}, bos_first=True)
    template = Environment().from_string(text_template_jinja(fmt))
    chat = fmt.conversation("Why?", "Because.") + [{"role": "user", "content": "And?"}]
    assert template.render(messages=chat[:-1]) == fmt.render_example(chat[:-1])
    assert template.render(messages=chat) == fmt.render_prompt(chat)
    # a client that sends no system message gets the one training used, as `ftl generate` adds it
    assert template.render(messages=[{"role": "user", "content": "Why?"}]) == \
        fmt.render_prompt(fmt.conversation("Why?"))


def test_a_chat_template_carries_the_fine_tunes_system_prompt():
    from jinja2 import Environment

    from ftl.chat import PromptFormat
    from ftl.export.gguf_export import chat_template_for

    source = ("{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}\n{%- endfor -%}"
              "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
    plain = PromptFormat(kind="chat", chat_template=source)
    assert chat_template_for(plain, source) == (None, "the source's")
    template, words = chat_template_for(plain.model_copy(update={"system_prompt": "Be brief."}), source)
    assert words == "the source's, with the fine-tune's system prompt"
    user = [{"role": "user", "content": "Why?"}]
    render = (lambda t, m: Environment().from_string(t).render(messages=m, add_generation_prompt=True))
    assert render(template, user) == render(source, [{"role": "system", "content": "Be brief."}] + user)
    own = [{"role": "system", "content": "Be long."}] + user
    assert render(template, own) == render(source, own)
