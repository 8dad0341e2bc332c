"""``ftl export-gguf``: a qscale fine-tune's trained grid written into the GGUF its base came from.

A model ``ftl models import`` read from a GGUF keeps that file's grids (``ftl.quant.gguf_grid``);
qscale trains their scales and minimums with the codes fixed. Q4_1 stores an fp16 scale and
minimum per block of 32, the precision qscale rounds its trained values to, so the trained model
is a Q4_1 file, exactly: this module copies the source file (metadata, tokenizer, the embedding's
and head's grids, norms) and replaces each trained matrix's blocks. Every tensor is then read back
with gguf-py and checked bit for bit: the trained ones against the grid, the others against the
source file's bytes. llama.cpp, Ollama and LM Studio open the result.

Only grids whose trained values the GGUF type stores exactly are written: Q4_1/Q5_1-style fp16
scale and minimum (Q4_1 here), and fp16-scale integer zero-point types (Q4_0, Q8_0) when the zero
point is the type's own. A K-quant's trained scales are fp32 products of a 6-bit sub-scale and an
fp16 super-scale, which the type cannot store: such a fine-tune is refused in one line
(``ftl export-onnx`` writes it exactly).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ftl import manifest
from ftl.errors import ConfigError, ExportError
from ftl.quant.grid import Grid
from ftl.system import folder_size_mb

FILE = "model.gguf"
_HALF = np.float16


@dataclass
class GgufResult:
    output: Path
    file: Path
    size_mb: float
    seconds: float
    trained: int  # matrices whose blocks were replaced
    copied: int  # tensors copied as they are
    chat_template: str  # which chat template the file carries, in words
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)


def storable(grid: Grid, where: str | None = None) -> ExportError | None:
    """Why the grid has no exact block in its GGUF type, or None."""
    if grid.scale.dtype != torch.float16:
        return _unstorable(grid, "its scales are fp32 products (a K-quant's sub-scales)", where)
    if grid.kind == "Q4_1" and grid.zero_point is None and grid.minimum.dtype == torch.float16:
        return None
    own = {"Q4_0": 8, "Q8_0": 128}.get(grid.kind)
    if own is not None and grid.zero_point is not None and bool((grid.zero_point == own).all()):
        return None
    return _unstorable(grid, "GGUF has no block of this type with this zero point or minimum", where)


def encode(grid: Grid) -> np.ndarray:
    """The GGUF blocks [N, K/32 · type size] of a grid in its own type (Q4_1, Q4_0, Q8_0), or ExportError."""
    problem = storable(grid)
    if problem:
        raise problem
    n, k = grid.codes.shape
    codes = grid.codes.numpy().reshape(n, k // 32, 32)
    d = grid.scale.numpy()
    if grid.kind == "Q4_1":
        parts = [d, grid.minimum.numpy(), _nibbles(codes)]
    elif grid.kind == "Q4_0":
        parts = [d, _nibbles(codes)]
    else:
        parts = [d, (codes.astype(np.int16) - 128).astype(np.int8)]
    return np.concatenate([np.ascontiguousarray(p).reshape(n, k // 32, -1).view(np.uint8) for p in parts],
                          axis=-1).reshape(n, -1)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1's packing: byte j of a block holds code j (low nibble) and code j + 16 (high)."""
    return (codes[..., :16] & 0xF) | ((codes[..., 16:] & 0xF) << 4)


def _unstorable(grid: Grid, why: str, where: str | None = None) -> ExportError:
    return ExportError(f"a trained {grid.kind} grid cannot be stored exactly as GGUF: {why}", where,
                       "export it with `ftl export-onnx`, which writes any grid exactly")


def source_gguf(model_dir: Path) -> Path:
    """The GGUF file ``ftl models import`` read ``model_dir`` from, or a one-line error."""
    record = manifest.read(model_dir) or {}
    inputs = record.get("inputs", {}) if record.get("stage") == "import" else {}
    if not inputs.get("gguf_file"):
        raise ConfigError(f"{model_dir} was not imported from a GGUF file; export-gguf rewrites the file a model "
                          "came from", str(model_dir), "import the model from its .gguf (`ftl models import "
                          "FILE.gguf`), or convert an HF model with llama.cpp's convert_hf_to_gguf.py")
    path = Path(inputs["resolved"]) / inputs["gguf_file"]
    if not path.is_file():
        raise ConfigError(f"the GGUF file {model_dir.name} was imported from is gone", str(path),
                          f"put it back, or import the model again (`ftl models import {inputs.get('source')} --force`)")
    return path


def gguf_names(gguf_path: Path, model_dir: Path) -> tuple[dict[str, str], object]:
    """{GGUF tensor name: HF module} for the file's tensors, and transformers' processor for it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    config = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    architecture = read_field(GGUFReader(gguf_path), "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    return {g: h.removesuffix(".weight") for g, h in get_gguf_hf_weights_map(model, processor).items()}, processor


def file_order(grid: Grid, order: torch.Tensor | None) -> Grid:
    """The grid in the file's row order: the import stored ``file[order]`` (llama.cpp's q/k rows)."""
    from ftl.quant.gguf_grid import permute_rows

    if order is None or torch.equal(order, torch.arange(len(order))):
        return grid
    return permute_rows(grid, torch.argsort(order))


def write(source: Path, target: Path, grids: dict[str, Grid], model_dir: Path,
          chat_template: str | None = None, extra: dict[str, str] | None = None) -> tuple[int, int]:
    """Copy ``source`` to ``target`` with each HF module in ``grids`` written as its grid's blocks;
    (trained, copied) tensor counts. Tensors are streamed from the mapped source: memory holds one
    encoded matrix at a time beyond the writer's."""
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    from ftl.models.gguf_import import _row_order

    reader = GGUFReader(source)
    if reader.endianess.name != "LITTLE":
        raise ExportError("the source GGUF is big-endian; ftl writes little-endian blocks only", str(source),
                          "convert it with gguf-py's gguf_convert_endian.py first")
    names, processor = gguf_names(source, model_dir)
    wanted = {g: h for g, h in names.items() if h in grids}
    missing = set(grids) - set(wanted.values())
    if missing:
        raise ExportError(f"the GGUF file has no tensor for {sorted(missing)[0]}", str(source),
                          "export from the model the fine-tune was trained on")
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(str(target), arch=arch, endianess=reader.endianess)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    for item in reader.fields.values():
        if item.name == gguf.Keys.General.ARCHITECTURE or item.name.startswith("GGUF."):
            continue
        if chat_template is not None and item.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            continue
        kind = item.types[0]
        writer.add_key_value(item.name, item.contents(), kind,
                             sub_type=item.types[-1] if kind == GGUFValueType.ARRAY else None)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    orders: dict[str, torch.Tensor | None] = {}
    for tensor in reader.tensors:
        if tensor.name in wanted:
            grid = grids[wanted[tensor.name]]
            shape = tuple(int(s) for s in reversed(tensor.shape))
            if tuple(grid.codes.shape) != shape:
                raise ExportError(f"{wanted[tensor.name]} is {tuple(grid.codes.shape)}, the file's {tensor.name} "
                                  f"{shape}", str(source), "export from the model the fine-tune was trained on")
            if tensor.tensor_type.name != grid.kind:
                raise ExportError(f"{tensor.name} is {tensor.tensor_type.name} in the file, the grid {grid.kind}",
                                  str(source), "export from the model the fine-tune was trained on")
            orders[tensor.name] = _row_order(processor, tensor.name, shape[0])
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:  # one encoded matrix in memory at a time; the rest streams from the map
        data = tensor.data
        if tensor.name in wanted:
            data = encode(file_order(grids[wanted[tensor.name]], orders[tensor.name]))
            if data.nbytes != tensor.n_bytes:
                raise ExportError(f"{tensor.name}: {data.nbytes} bytes encoded, {tensor.n_bytes} in the file",
                                  str(source), "report this: the GGUF block layout differs")
            data = data.reshape(tensor.data.shape)
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return len(wanted), len(reader.tensors) - len(wanted)


def check(target: Path, source: Path, grids: dict[str, Grid], model_dir: Path) -> None:
    """Read ``target`` back: every written matrix's grid equals ``grids`` bit for bit (codes, scales,
    minimums, rows in the model's order), every other tensor the source's bytes, and the metadata
    the source's (but the chat template and ftl's own keys)."""
    from gguf import GGUFReader

    from ftl.models.gguf_import import _row_order
    from ftl.quant.gguf_grid import grid_from_gguf, permute_rows

    written, original = GGUFReader(target), GGUFReader(source)
    names, processor = gguf_names(source, model_dir)
    for name, item in original.fields.items():
        if name.startswith(("GGUF.", "ftl.")) or name == "tokenizer.chat_template":
            continue
        if name not in written.fields or written.fields[name].contents() != item.contents():
            raise ExportError(f"the written GGUF's {name} differs from the source's", str(target), "report this")
    theirs = {t.name: t for t in original.tensors}
    if [t.name for t in written.tensors] != list(theirs):
        raise ExportError("the written GGUF does not list the source's tensors", str(target), "report this")
    for tensor in written.tensors:
        module = names.get(tensor.name)
        if module in grids:
            shape = tuple(int(s) for s in reversed(tensor.shape))
            found = grid_from_gguf(tensor.data, tensor.tensor_type, shape)
            order = _row_order(processor, tensor.name, shape[0])
            if order is not None and not torch.equal(order, torch.arange(len(order))):
                found = permute_rows(found, order)
            if not _same_grid(found, grids[module]):
                raise ExportError(f"{tensor.name} does not read back as the trained grid", str(target), "report this")
        elif not np.array_equal(np.asarray(tensor.data).view(np.uint8), np.asarray(theirs[tensor.name].data).view(np.uint8)):
            raise ExportError(f"{tensor.name} differs from the source file's", str(target), "report this")


def _same_grid(found: Grid | None, want: Grid) -> bool:
    if found is None or found.kind != want.kind:
        return False
    same = torch.equal(found.codes, want.codes) and torch.equal(found.scale.to(want.scale.dtype), want.scale)
    if want.zero_point is None:
        return same and torch.equal(found.minimum.to(want.minimum.dtype), want.minimum)
    return same and torch.equal(found.zero_point, want.zero_point)


def text_template_jinja(fmt) -> str:
    """A text prompt format as a Jinja chat template that renders what ftl trained on and prompts with
    (``PromptFormat.render_prompt`` / ``render_example``, the default system prompt included):
    llama.cpp's chat then formats the same."""
    head, tail = fmt.text_template.split("{" + fmt.answer_field + "}", 1)
    before, after = head.split("{" + fmt.question_field + "}", 1)
    bos = _lit(fmt.special_tokens.get("bos_token", "") if fmt.bos_first else "")
    system = ("{%- if messages[0]['role'] != 'system' -%}{{- " + _lit(fmt.system_prompt + "\n\n") +
              " -}}{%- endif -%}") if fmt.system_prompt else ""
    return ("{{- " + bos + " -}}" + system +
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{- m['content'] + \"\\n\\n\" -}}"
            "{%- elif m['role'] == 'user' -%}{{- " + _lit(_unbrace(before)) + " + m['content'] + " +
            _lit(_unbrace(after)) + " -}}"
            "{%- else -%}{{- m['content'] + " + _lit(_unbrace(tail)) + " + " + _lit(fmt.eos_token) + " -}}"
            "{%- endif -%}{%- endfor -%}")


def _lit(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's; non-ASCII kept as it is)."""
    return json.dumps(text, ensure_ascii=False)


def _unbrace(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


def chat_template_for(fmt, source_template: str | None) -> tuple[str | None, str]:
    """The chat template the GGUF should carry for prompts formatted as the fine-tune was trained
    (None: the source file's own), and what it is, in words."""
    if fmt.kind == "text":
        return text_template_jinja(fmt), "the fine-tune's text template"
    template, words = fmt.chat_template, "the source's"
    if template != source_template:
        words = "the fine-tune's"
    if fmt.system_prompt:  # a conversation without a system message gets the one training used
        template = ("{%- if messages[0]['role'] != 'system' -%}{%- set messages = [{'role': 'system', 'content': "
                    + _lit(fmt.system_prompt) + "}] + messages -%}{%- endif -%}" + template)
        words += ", with the fine-tune's system prompt"
    return (None if template == source_template else template), words


def export_gguf(adapter: Path | None, model: str | None, output: Path, *, force: bool = False) -> GgufResult:
    """Write the model (a qscale fine-tune of it, with ``adapter``) as ``output/model.gguf``."""
    from ftl.chat import PromptFormat, prompt_format_for
    from ftl.export.exact import plan_grid
    from ftl.lineage import base_of_qscale, check_adapter_base, qscale_of, training_record
    from ftl.models import model_identity, resolve_model

    started = time.perf_counter()
    qscale = qscale_of(adapter) if adapter else None
    if adapter and not qscale:
        raise ConfigError("export-gguf writes a qscale fine-tune (or a model as imported); a LoRA's changes "
                          "round away on the int4 grid", str(adapter),
                          "fine-tune with --method qscale, or export the LoRA with `ftl export-onnx`")
    model_ref = model or (base_of_qscale(qscale) if qscale else None)
    if not model_ref:
        raise ConfigError("no model to export", str(qscale) if qscale else None,
                          "pass --model (an imported GGUF model)")
    model_dir = resolve_model(model_ref)
    base = model_identity(model_dir)
    if qscale:
        check_adapter_base(qscale.parent, base)
    source = source_gguf(model_dir)
    trained = training_record(qscale.parent) if qscale else {}
    fmt = PromptFormat(**trained["prompt_format"]) if trained.get("prompt_format") else prompt_format_for(model_dir)
    source_sha, qscale_sha = manifest.sha256_file(source), manifest.sha256_file(qscale) if qscale else None
    fingerprint = manifest.sha256_json({"base": base, "qscale": qscale_sha, "source": source_sha,
                                        "format": fmt.model_dump(), "writer": "gguf-1"})
    out = Path(output)
    if manifest.is_complete(out, fingerprint) and not force:
        record = manifest.read(out)
        return GgufResult(out, out / FILE, record["metrics"]["size_mb"], record["timings"]["seconds"],
                          record["outputs"]["trained_matrices"], record["outputs"]["copied_tensors"],
                          record["outputs"]["chat_template"], skipped=True)
    plan = plan_grid(model_dir, qscale=qscale) if qscale else None
    grids, base_grids = (plan.grids, plan.built_from) if plan else ({}, {})
    for name, grid in grids.items():
        problem = storable(grid, name)
        if problem:
            raise problem
        if name not in base_grids or not torch.equal(grid.codes, base_grids[name].codes):
            raise ExportError(f"{name} has no grid from the GGUF file, or codes that differ from it", str(source),
                              "export with the model the fine-tune was trained on")
    manifest.prepare_output(out, force=force, stage="export-gguf")
    record = manifest.new("export-gguf", inputs={
        "base_model": base, "source_gguf": {"path": str(source), "sha256": source_sha},
        "adapter": {"path": str(qscale.resolve()), "sha256": qscale_sha} if qscale else None},
        params={"model": str(model_ref), "adapter": str(adapter) if adapter else None}, fingerprint=fingerprint)
    record["prompt_format"] = fmt.model_dump()
    manifest.write(out, record)
    from gguf import GGUFReader

    field_ = GGUFReader(source).fields.get("tokenizer.chat_template")
    template, chat = chat_template_for(fmt, str(field_.contents()) if field_ is not None else None)
    partial = out / (FILE + ".partial")
    extra = {"ftl.source": source.name, "ftl.adapter_sha256": record["inputs"]["adapter"]["sha256"]} if qscale else \
        {"ftl.source": source.name}
    trained_count, copied = write(source, partial, grids, model_dir, template, extra)
    check(partial, source, grids, model_dir)
    os.replace(partial, out / FILE)
    seconds = time.perf_counter() - started
    size_mb = folder_size_mb(out / FILE)  # the file itself
    record.update(status="complete", timings={"seconds": round(seconds, 1)}, metrics={"size_mb": size_mb})
    record["outputs"] = {"file": FILE, "trained_matrices": trained_count, "copied_tensors": copied,
                         "chat_template": chat, "checked": "read back with gguf-py: trained grids bit for bit, "
                         "other tensors byte for byte"}
    manifest.write(out, record)
    return GgufResult(out, out / FILE, size_mb, seconds, trained_count, copied, chat)
