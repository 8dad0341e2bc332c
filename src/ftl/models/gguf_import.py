"""A GGUF file, or an HF folder, to an imported model folder without loading the model.

GGUF: transformers' GGUF loader dequantises the whole file into one fp32 state dict, builds the
model around it and ``save_pretrained`` copies it again: about 9 bytes of RSS per parameter. Here
the same steps run one tensor at a time, with transformers' own pieces (its per-architecture
``TENSOR_PROCESSORS``, its GGUF→HF name map built on a model on the meta device): gguf-py
dequantises a tensor from the memory-mapped file, the processor does what it does in
``load_gguf_checkpoint`` (Llama's q/k row order, Gemma's norm offset), and the fp32 tensor goes to a
shard on disk. Peak RSS: the largest tensor in fp32, plus the libraries.

Beside the weights, each quantised matrix's grid is read from the file (``ftl.quant.gguf_grid``),
rows ordered as the processor orders the weight's, checked to dequantise to the written weight bit
for bit, and stored in the grid sidecar for the export and qscale.
"""

from __future__ import annotations

import json
import mmap
import shutil
from dataclasses import dataclass, field
from pathlib import Path

SHARD_BYTES = 1 << 30  # fp32 shards of at most 1 GiB, as save_pretrained would split them
GRIDS_VERSION = 1  # in the import fingerprint: an import made before the grid sidecar existed is redone
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# What an HF folder carries besides its weights: config, generation config, tokenizer, chat template.
_FOLDER_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
_NOT_COPIED = {"manifest.json", "adapter_config.json"}  # ftl's record; a PEFT adapter's config


@dataclass
class StreamedImport:
    parameters: int
    grids: int
    without_grid: list[str] = field(default_factory=list)  # one line per quantised matrix kept without its grid


def streams(gguf_path: Path) -> bool:
    """Whether transformers reads this file with its legacy loader (every architecture but the few
    its new GGUF path converts with ops of its own): those are the ones streamed here."""
    from gguf import GGUFReader
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import read_field

    return not is_gguf_arch_supported(read_field(GGUFReader(gguf_path), "general.architecture")[0])


def import_gguf(gguf_path: Path, target: Path, config, *, shard_bytes: int = SHARD_BYTES) -> StreamedImport:
    """Write ``gguf_path``'s weights into ``target`` as fp32 safetensors shards (plus the index when
    there are several) and its grids into the sidecar; ``config`` is transformers' config of the
    file. The folder loads with ``from_pretrained`` to the tensors transformers' own GGUF load gives."""
    import numpy as np
    import torch
    from gguf import GGML_QUANT_SIZES, GGUFReader, dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    from ftl.quant.gguf_grid import GRID_FILE, GridWriter

    reader = GGUFReader(gguf_path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
        config=load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf_names = get_gguf_hf_weights_map(model, processor)
    side: dict = {"tensors": {}}  # what a processor stores by itself (MoE experts, GPT-2's head)
    shards, grids, without_grid = _Shards(target, shard_bytes), GridWriter(target / GRID_FILE), []
    try:
        for tensor in reader.tensors:
            result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                       tensor_key_mapping=hf_names, parsed_parameters=side)
            if result.name in hf_names:
                name = hf_names[result.name]
                weight = torch.from_numpy(_writable(np.ascontiguousarray(result.weights))).float()
                shards.add(name, weight)
                if weight.dim() == 2 and GGML_QUANT_SIZES[tensor.tensor_type][0] > 1:
                    problem = _add_grid(grids, name.removesuffix(".weight"), tensor, weight, processor)
                    if problem:
                        without_grid.append(problem)
                del weight, result
            _release(reader)
        for name, weight in side["tensors"].items():
            shards.add(name, weight.float())
        _check_complete(model, shards, gguf_path)
        parameters = shards.close()
        if len(grids):
            grids.close({"source": Path(gguf_path).name, "format": "ftl-gguf-grid", "version": str(GRIDS_VERSION)})
        else:
            grids.discard()
    except BaseException:
        shards.discard()
        grids.discard()
        raise
    config.architectures = [type(model).__name__]  # what save_pretrained writes
    config.dtype = "float32"
    config.save_pretrained(target)
    if model.can_generate():
        model.generation_config.save_pretrained(target)
    return StreamedImport(parameters, len(grids), without_grid)


def summarise(without_grid: list[str]) -> list[str]:
    """One line per GGUF type and reason, from the per-matrix lines ``name (TYPE): reason`` (the
    manifest keeps them all): an IQ4_XS file has hundreds."""
    groups: dict[tuple[str, str], list[str]] = {}
    for line in without_grid:
        head, reason = line.split(": ", 1)
        name, kind = head.rsplit(" (", 1)
        groups.setdefault((kind.rstrip(")"), reason), []).append(name)
    return [f"{len(names)} matri{'x' if len(names) == 1 else 'ces'} of type {kind} ({names[0]}"
            f"{', …' if len(names) > 1 else ''}): {reason} (manifest: outputs.without_grid)"
            for (kind, reason), names in groups.items()]


def _writable(array):
    """gguf-py returns an F32 tensor as a view of the read-only mapping; torch wants its own buffer."""
    return array if array.flags.writeable else array.copy()


def _release(reader) -> None:
    """Drop the mapped file's pages from this process (the page cache keeps them): read through the
    map, the whole file would count in RSS by the end of the import."""
    handle = getattr(reader.data, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def _add_grid(grids, name: str, tensor, weight, processor) -> str | None:
    """Store the matrix's grid, rows in the weight's order; or say in one line why it has none."""
    import torch

    from ftl.quant.gguf_grid import grid_from_gguf, matches, permute_rows

    kind = tensor.tensor_type.name
    grid = grid_from_gguf(tensor.data, tensor.tensor_type, tuple(int(s) for s in reversed(tensor.shape)))
    if grid is None:
        return f"{name} ({kind}): ftl cannot read this GGUF type's grid; the export quantises it again"
    order = _row_order(processor, tensor.name, grid.codes.shape[0])
    if order is None:
        return f"{name} ({kind}): transformers changes this tensor beyond reordering its rows; no exact grid"
    if not torch.equal(order, torch.arange(len(order))):
        grid = permute_rows(grid, order)
    if not matches(grid, weight):
        return f"{name} ({kind}): the grid read from the file does not give the imported weight bit for bit"
    grids.add(name, grid)
    return None


def _row_order(processor, gguf_name: str, rows: int):
    """The row permutation transformers' processor applies to this tensor, found by running it on
    the row numbers; None when what it does is not a row permutation."""
    import numpy as np
    import torch

    probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    try:
        out = np.asarray(processor.process(weights=probe, name=gguf_name, tensor_key_mapping={},
                                           parsed_parameters={"tensors": {}}).weights)
    except Exception:  # a processor that reshapes by the real width (Bloom's fused qkv): not a row order
        return None
    if out.shape != (rows, 1) or not np.array_equal(np.sort(out[:, 0]), probe[:, 0]):
        return None
    return torch.from_numpy(out[:, 0].astype(np.int64))


def _check_complete(model, shards: _Shards, gguf_path: Path) -> None:
    """Every weight the model has must come from the file: transformers would fill a missing one
    with random values and only log it."""
    from ftl.errors import ConfigError

    missing = sorted(set(model.state_dict()) - set(model.all_tied_weights_keys) - set(shards.weight_map))
    if missing:
        raise ConfigError(f"the GGUF file has no tensor for {len(missing)} of the model's weights "
                          f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})", str(gguf_path),
                          "convert the original model to an HF folder and import that")


class _Shards:
    """fp32 safetensors shards of at most ``limit`` bytes, written as tensors come and named as
    save_pretrained names them once their number is known."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = Path(folder), limit
        self.files: list = []  # TensorFileWriter, one per shard
        self.weight_map: dict[str, int] = {}
        self.total = self.parameters = 0

    def add(self, name: str, tensor) -> None:
        from ftl.tensorfile import TensorFileWriter

        size = tensor.numel() * tensor.element_size()
        if not self.files or (self.files[-1].nbytes and self.files[-1].nbytes + size > self.limit):
            if self.files:
                self.files[-1].close({"format": "pt"})
            self.files.append(TensorFileWriter(self.folder / f".shard-{len(self.files)}"))
        self.files[-1].add(name, tensor)
        self.weight_map[name] = len(self.files) - 1
        self.total += size
        self.parameters += tensor.numel()

    def close(self) -> int:
        """Finish the last shard, name them all (and write the index); the parameter count."""
        self.files[-1].close({"format": "pt"})
        count = len(self.files)
        names = [WEIGHTS] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for writer, name in zip(self.files, names):
            writer.path.rename(self.folder / name)
        if count > 1:
            index = {"metadata": {"total_parameters": self.parameters, "total_size": self.total},
                     "weight_map": {name: names[i] for name, i in self.weight_map.items()}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return self.parameters

    def discard(self) -> None:
        for writer in self.files:
            writer.discard()
            writer.path.unlink(missing_ok=True)


def copy_hf_folder(origin: Path, target: Path) -> int | None:
    """Copy an HF folder's safetensors weights, config and tokenizer files as they are (the model is
    never loaded: memory stays flat at any size); the parameter count, from the safetensors headers.
    None when the folder has no safetensors weights (a ``pytorch_model.bin`` needs a real load)."""
    from ftl.quant.gguf_grid import GRID_FILE
    from ftl.tensorfile import parameter_count, weight_files

    origin = Path(origin)
    weights = weight_files(origin)
    config = origin / "config.json"
    if weights is None or not config.is_file() or "quantization_config" in json.loads(config.read_text()):
        return None  # a pre-quantised folder (GPTQ, AWQ, FP8) or one without a config: transformers' full load
    extras = [p for p in sorted(origin.iterdir()) if p.is_file() and p.name not in _NOT_COPIED
              and (p.suffix in _FOLDER_SUFFIXES or p.name == GRID_FILE)]
    for source in dict.fromkeys(weights + extras):
        # a copy, not a hard link: a later in-place rewrite of the source would change the import too
        shutil.copyfile(source, Path(target) / source.name)
    return parameter_count(weights)
