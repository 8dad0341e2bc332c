"""Write a model's int4 grid into an onnxruntime-genai folder exactly.

og's builder quantises from float weights, with an integer zero point per block. A GGUF Q4_1
model (and a qscale fine-tune) is already int4, on a grid w = minimum + scale·code with a float
minimum: re-quantising it moves every block off that grid (INT4.md: +22.5% perplexity on the base).
This module takes the folder og built and puts the grid back, bit for bit, in one of two forms:

- ``offset`` (the default): MatMulNBits keeps an integer zero point z = round(−minimum/scale), so
  onnxruntime pre-packs it as usual, and the leftover c = minimum + scale·z of each block is added
  back as c · (sum of the input over that block): one block-sum MatMul per input (shared by
  q/k/v and by gate/up, which read the same tensor) and one small fp32 MatMul (K/32 × N).
- ``float-zp``: MatMulNBits with float zero points −minimum/scale. Simple, but onnxruntime cannot
  pre-pack it (about 60× slower a call); kept to measure against (bench/quality.py).

The result is still an og folder: any og client opens it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ftl.errors import ExportError
from ftl.quant.grid import BLOCK, Grid, Grid8, nearest_zero_point

FORMS = ("offset", "float-zp")
GRID_RECORD = "int4_grid.json"  # what was written, beside model.onnx; the export manifest carries it
_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+?)/MatMul")
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PARENT = {"attn": "self_attn", "mlp": "mlp"}


@dataclass
class Written:
    form: str
    matrices: int
    blocks: int
    head: bool = False  # the int8 head (and the tied embedding) hold the model's Q8_0 grid exactly
    eight_bit: int = 0  # MatMuls written as 8-bit MatMulNBits (grids of more than 4 bits, or blocks of 16)
    extra_mb: float = 0.0  # what those cost over og's 4-bit, block-32 form
    kinds: tuple[str, ...] = ()  # the GGUF types written
    packed: int = 0  # gate/up pairs written as one MatMulNBits (each one node fewer than og built)

    def as_dict(self) -> dict:
        return {"form": self.form, "matrices": self.matrices, "blocks": self.blocks, "exact_head": self.head,
                "eight_bit_matrices": self.eight_bit, "eight_bit_extra_mb": round(self.extra_mb, 1),
                "grid_types": list(self.kinds), "gate_up_packed": self.packed}


def modules_of(node_name: str) -> list[str] | None:
    """The HF modules an og MatMulNBits node computes (several when og packs them), or None."""
    match = _NODE.match(node_name)
    if not match:
        return None
    layer, block, proj = match.groups()
    prefix = f"model.layers.{layer}.{_PARENT[block]}"
    return [f"{prefix}.{name}" for name in _PACKED.get(proj, (proj,))]


def zero_points(grid: Grid) -> torch.Tensor:
    """The grid's own integer zero point, else the one nearest to −minimum/scale (8 for a
    zero-scale block)."""
    return grid.zero_point.float() if grid.zero_point is not None else nearest_zero_point(grid)


def offsets(grid: Grid, z: torch.Tensor) -> torch.Tensor:
    """c = minimum + scale·z per block: what the integer zero point leaves out (exact in fp32 for an
    fp16 scale; 0 for a grid whose own zero point is integer)."""
    return grid.float_minimum() + grid.scale.float() * z


def float_zero_points(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, K], scale, float zero point [N, K/32]) with (code − zp)·scale = minimum + scale·code.

    zp = −minimum/scale holds any non-zero scale, a trained negative one included. A zero-scale block
    (a constant Q4_1 block) has no such zp: it becomes code 0, scale = minimum, zp = −1, so its
    minimum is kept rather than dropped."""
    n, k = grid.codes.shape
    d, m = grid.scale.float().numpy(), grid.float_minimum().numpy()
    flat = d == 0
    zp = np.where(flat, -1.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
    codes = grid.codes.numpy().reshape(n, k // BLOCK, BLOCK).copy()
    codes[flat] = 0
    return codes.reshape(n, k), np.where(flat, m, d).astype(np.float32), zp


def _pack(values: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, the even one in the low nibble (MatMulNBits)."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), values.dtype)], axis=-1)
    return (values[..., ::2] & 0xF) | ((values[..., 1::2] & 0xF) << 4)


def _unpack(packed: np.ndarray, count: int) -> np.ndarray:
    both = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return both[..., :count]


def _store(values: np.ndarray, bits: int) -> np.ndarray:
    """Codes or zero points as MatMulNBits stores them: packed for 4 bits, one byte each for 8."""
    return _pack(values) if bits == 4 else values.astype(np.uint8)


def _load(stored: np.ndarray, bits: int, count: int) -> np.ndarray:
    return _unpack(stored, count) if bits == 4 else stored[..., :count]


@dataclass
class NodeGrid:
    """The grids of one MatMulNBits node (several rows of grids when og packs q/k/v), in one
    MatMulNBits form: ``bits`` (4 when every grid fits, else 8), ``block`` (the smallest), an
    integer zero point per block, and the fp32 offset c = minimum + scale·z each block still needs
    (exactly 0 for grids whose own zero point is integer: Q4_0, Q5_0, Q6_K, Q8_0)."""

    codes: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # fp32 [N, K/block]
    zero_point: np.ndarray  # uint8 [N, K/block]
    offset: np.ndarray  # fp32 [N, K/block]
    bits: int
    block: int
    kinds: tuple[str, ...]


def node_grid(grids: list[Grid]) -> NodeGrid:
    bits = 4 if all(g.bits <= 4 for g in grids) else 8
    block = min(g.block for g in grids)
    parts = [g.reblocked(block) for g in grids]
    zs = [zero_points(g) for g in parts]
    return NodeGrid(np.concatenate([g.codes.numpy() for g in parts]),
                    np.concatenate([g.scale.float().numpy() for g in parts]),
                    np.concatenate([z.numpy().astype(np.uint8) for z in zs]),
                    np.concatenate([offsets(g, z).numpy() for g, z in zip(parts, zs)]),
                    bits, block, tuple(dict.fromkeys(g.kind for g in grids)))


def write_grid(folder: Path, grids: dict[str, Grid], form: str = "offset", head: Grid8 | None = None,
               built_from: dict[str, Grid] | None = None, left: list[str] = (), pack: bool = True) -> Written:
    """Replace the body MatMulNBits weights of an og folder by these grids, exactly; with ``head``,
    the int8 head (which a tied embedding reads too) gets its Q8_0 grid as well.

    og builds every body MatMul as 4 bits, block 32. A node whose grids need more (Q5_0, Q6_K, Q8_0:
    codes of 5–8 bits; Q6_K: blocks of 16) is rewritten as an 8-bit MatMulNBits with those blocks,
    which holds them exactly and, at og's CPU accuracy level 4, pre-packs like the 4-bit one.
    ``built_from``: the grids of the weights og built from, when they are not ``grids`` (a qscale
    fine-tune's trained scales): what the sanity check compares the built matrices with. ``left``:
    modules with no grid to keep (a GGUF type ftl cannot hold): their nodes stay as og built them.
    ``pack``: gate_proj and up_proj (one input) become one MatMulNBits with one offset correction
    and a Split (:func:`pack_gate_up`)."""
    import onnx
    from onnx import helper, numpy_helper

    if form not in FORMS:
        raise ValueError(f"unknown grid form {form!r}")
    folder = Path(folder)
    model = onnx.load(str(folder / "model.onnx"))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    sums: dict[tuple[str, int], str] = {}
    done, blocks, wide, extra, kinds = set(), 0, 0, 0, {}
    new_nodes = []
    head_written = head is not None and _write_head(graph, inits, head, folder)
    packed = 0
    if pack:  # where both have a grid of one MatMulNBits form (else the wider would cost the other bytes)
        packed = pack_gate_up(graph, inits, lambda modules: all(m in grids for m in modules) and
                     len({(grids[m].bits <= 4, grids[m].block) for m in modules}) == 1)
    for node in list(graph.node):
        modules = modules_of(node.name) if node.op_type == "MatMulNBits" else None
        if not modules:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        missing = [m for m in modules if m not in grids]
        if missing and set(missing) <= set(left):
            new_nodes.append(node)
            continue
        if missing:
            raise ExportError(f"no int4 grid for {missing[0]}", node.name, "the grid and the ONNX model come "
                              "from different models; export from the model the grid was taken from")
        target = node_grid([grids[m] for m in modules])
        n, k = target.codes.shape
        if (attrs.get("N"), attrs.get("K"), attrs.get("bits", 4), attrs.get("block_size")) != (n, k, 4, BLOCK):
            raise ExportError(f"{node.name} is {attrs.get('N')}×{attrs.get('K')}, {attrs.get('bits')} bits, block "
                              f"{attrs.get('block_size')}; the grid is {n}×{k}", str(folder),
                              "build the folder with block size 32 and an int4 body")
        _check_close(node_grid([(built_from or grids)[m] for m in modules]), inits, node, attrs)
        nb = k // target.block
        codes, scale = target.codes, target.scale
        if form == "float-zp":
            if (target.bits, target.block) != (4, BLOCK):
                raise ExportError(f"{node.name}'s grid ({'/'.join(target.kinds)}) is not 4 bits in blocks of 32",
                                  str(folder), "use the offset form (the default)")
            codes, scale, zp = float_zero_points(_concat([grids[m] for m in modules]))
        if (target.bits, target.block) != (attrs.get("bits", 4), attrs["block_size"]):
            _set_attr(node, "bits", target.bits)
            _set_attr(node, "block_size", target.block)
            wide += 1
            extra += stored_bytes(n, k, target.bits, target.block) - stored_bytes(n, k, 4, BLOCK)
        kinds.update(dict.fromkeys(target.kinds))
        stored = _store(codes.reshape(n, nb, target.block), target.bits)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(stored, node.input[1]))
        shape = inits[node.input[2]].dims if np.prod(inits[node.input[2]].dims) == scale.size else [scale.size]
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(scale.reshape(shape).astype(np.float32), node.input[2]))
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else f"{node.input[1]}_zp"
        if form == "float-zp":
            _set_init(graph, inits, numpy_helper.from_array(zp.reshape(-1), zp_name))
        else:
            _set_init(graph, inits, numpy_helper.from_array(_store(target.zero_point, target.bits).reshape(-1),
                                                            zp_name))
        inputs = list(node.input) + [""] * (4 - len(node.input))
        inputs[3] = zp_name
        del node.input[:]
        node.input.extend(inputs)
        new_nodes.append(node)
        if form == "offset" and bool(np.any(target.offset)):  # an integer zero-point grid needs no offset
            new_nodes.extend(_offset_nodes(graph, node, target.offset, sums, k, target.block))
        done.add(node.name)
        blocks += n * nb
    if not done:
        raise ExportError("the ONNX model has no int4 decoder MatMuls to write a grid into", str(folder),
                          "export with an int4 precision and block size 32")
    del graph.node[:]
    graph.node.extend(new_nodes)
    save_model(model, folder)
    return Written(form, len(done), blocks, head_written, wide, extra / 1e6, tuple(kinds), packed)


def pack_gate_up(graph, inits: dict, wanted=lambda modules: True) -> int:
    """og's gate_proj and up_proj MatMulNBits (the same input, the same form) as one node of twice the
    outputs, followed by a Split: what og itself does for Phi-3's gate_up_proj. With the exact grid
    it also halves the offset work (one offset MatMul and Add for both). On SmolLM2-135M with 2
    threads: 2 nodes a layer fewer, and one MatMulNBits of N = 3072 instead of two of 1536 (bench/forms.py).
    ``wanted(modules)``: pack only where it holds (both have a grid to write). The number packed."""
    from onnx import helper, numpy_helper

    nodes = {n.name: n for n in graph.node}
    packed: dict[str, list] = {}
    gone: set[str] = set()
    gone_inputs: set[str] = set()
    for name, gate in nodes.items():
        match = _NODE.match(name)
        if gate.op_type != "MatMulNBits" or not match or match.group(3) != "gate_proj":
            continue
        up = nodes.get(name.replace("/gate_proj/", "/up_proj/"))
        attrs = {a.name: helper.get_attribute_value(a) for a in gate.attribute}
        if up is None or up.input[0] != gate.input[0] or len(up.input) != len(gate.input) or \
                {a.name: helper.get_attribute_value(a) for a in up.attribute} != attrs or \
                any(i not in inits for i in list(gate.input[1:]) + list(up.input[1:])) or \
                not wanted(modules_of(name) + modules_of(up.name)) or \
                any("gate_proj" not in i or i.replace("gate_proj", "gate_up_proj") in inits for i in gate.input[1:]):
            continue  # (the packed weights are named after og's gate weights: "gate_proj" → "gate_up_proj")
        prefix = name.rsplit("/gate_proj/", 1)[0] + "/gate_up_proj"
        n = attrs["N"]
        inputs = [gate.input[0]]
        for a_name, b_name in zip(gate.input[1:], up.input[1:]):
            a, b = numpy_helper.to_array(inits[a_name]), numpy_helper.to_array(inits[b_name])
            flat = a.ndim == 1
            both = np.concatenate([a.reshape(n, -1), b.reshape(n, -1)])
            tensor = numpy_helper.from_array(both.reshape(-1) if flat else both.reshape((2 * n,) + a.shape[1:]),
                                             a_name.replace("gate_proj", "gate_up_proj"))
            graph.initializer.append(tensor)
            inits[tensor.name] = graph.initializer[-1]
            inputs.append(tensor.name)
        sizes = numpy_helper.from_array(np.array([n, n], np.int64), f"{prefix}/split_sizes")
        graph.initializer.append(sizes)
        inits[sizes.name] = graph.initializer[-1]
        out = f"{prefix}/MatMul/output_0"
        node = helper.make_node("MatMulNBits", inputs, [out], name=f"{prefix}/MatMul_Q4", domain="com.microsoft",
                                **{**attrs, "N": 2 * n})
        split = helper.make_node("Split", [out, sizes.name], [gate.output[0], up.output[0]], name=f"{prefix}/Split",
                                 axis=-1)
        packed[name] = [node, split]
        gone.update({name, up.name})
        gone_inputs.update(list(gate.input[1:]) + list(up.input[1:]))
    if not packed:
        return 0
    kept = []
    for node in graph.node:
        if node.name in packed:
            kept.extend(packed[node.name])
        elif node.name not in gone:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for node in kept for i in node.input}
    remaining = [t for t in graph.initializer if t.name in used or t.name not in gone_inputs]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    inits.clear()
    inits.update({t.name: t for t in graph.initializer})
    return len(packed)


def save_model(model, folder: Path) -> None:
    """An og folder's model.onnx with its weights in model.onnx.data, as og writes it."""
    import onnx

    data = Path(folder) / "model.onnx.data"
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(Path(folder) / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def stored_bytes(n: int, k: int, bits: int, block: int) -> int:
    """Codes, fp32 scales and zero points of an N×K MatMulNBits."""
    blocks = n * (k // block)
    return n * k * bits // 8 + blocks * 4 + (blocks if bits == 8 else (blocks + 1) // 2)


def _concat(grids: list[Grid]) -> Grid:
    """One grid of the rows of several (the float-zp form: 4 bits, blocks of 32)."""
    if len(grids) == 1:
        return grids[0]
    minimum = [g.float_minimum().to(g.scale.dtype) if g.minimum is None else g.minimum for g in grids]
    return Grid(torch.cat([g.codes for g in grids]), torch.cat([g.scale for g in grids]), torch.cat(minimum))


def _set_attr(node, name: str, value) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def _write_head(graph, inits: dict, head: Grid8, folder: Path) -> bool:
    """The 8-bit head MatMulNBits (producing ``logits``) as q + 128 with zero point 128: (code − 128)·scale
    is exactly scale·q. A 4-bit head is left as the builder wrote it (False)."""
    from onnx import helper, numpy_helper

    node = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if node is None:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k = head.q.shape
    if attrs.get("bits") != 8:
        return False
    if (attrs.get("N"), attrs.get("K"), attrs.get("block_size")) != (n, k, BLOCK):
        raise ExportError(f"the head is {attrs.get('N')}×{attrs.get('K')} block {attrs.get('block_size')}, its grid "
                          f"{n}×{k} block {BLOCK}", str(folder), "build with block size 32")
    codes = (head.q.numpy().astype(np.int16) + 128).astype(np.uint8).reshape(inits[node.input[1]].dims)
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(codes, node.input[1]))
    scale = head.scale.float().numpy().reshape(inits[node.input[2]].dims)
    inits[node.input[2]].CopyFrom(numpy_helper.from_array(scale, node.input[2]))
    if len(node.input) < 4 or not node.input[3]:
        raise ExportError("the int8 head has no zero points to write", str(folder), "export with k_quant_last")
    zp = np.full(inits[node.input[3]].dims, 128, np.uint8)
    inits[node.input[3]].CopyFrom(numpy_helper.from_array(zp, node.input[3]))
    return True


def _set_init(graph, inits: dict, tensor) -> None:
    if tensor.name in inits:
        inits[tensor.name].CopyFrom(tensor)
    else:
        graph.initializer.append(tensor)
        inits[tensor.name] = graph.initializer[-1]


def _offset_nodes(graph, node, c: np.ndarray, sums: dict[tuple[str, int], str], k: int, block: int) -> list:
    """Σ_b c[n, b] · (Σ of the input over block b), added to the MatMulNBits output.

    The block sums are one MatMul with a 0/1 indicator [K, K/block] (shared by every input of that
    width), measured a little faster than Reshape + ReduceSum: a node fewer per input."""
    from onnx import helper, numpy_helper

    new = []
    x = node.input[0]
    if (x, block) not in sums:
        indicator = f"/grid/block_indicator_{k}" + (f"_{block}" if block != BLOCK else "")
        if not any(i.name == indicator for i in graph.initializer):
            table = np.zeros((k, k // block), np.float32)
            table[np.arange(k), np.arange(k) // block] = 1.0
            graph.initializer.append(numpy_helper.from_array(table, indicator))
        sums[x, block] = f"{node.name}/grid_block_sums"
        new.append(helper.make_node("MatMul", [x, indicator], [sums[x, block]],
                                    name=f"{node.name}/grid_block_sums/MatMul"))
    out = node.output[0]
    raw = f"{out}/before_grid_offset"
    node.output[0] = raw
    table = f"{node.name}/grid_offset"
    graph.initializer.append(numpy_helper.from_array(c.T.copy().astype(np.float32), table))
    new.append(helper.make_node("MatMul", [sums[x, block], table], [f"{table}/out"], name=f"{table}/MatMul"))
    new.append(helper.make_node("Add", [raw, f"{table}/out"], [out], name=f"{table}/Add"))
    return new


def _check_close(target: NodeGrid, inits: dict, node, attrs: dict) -> None:
    """The builder's own weights (as built: 4 bits, block 32) approximate the grid (a wrong mapping
    is nowhere near)."""
    from onnx import numpy_helper

    n, k = target.codes.shape
    bits, block = attrs.get("bits", 4), attrs["block_size"]
    codes = _load(numpy_helper.to_array(inits[node.input[1]]), bits, block)
    codes = codes.reshape(n, k // block, block).astype(np.float32)
    scale = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k // block, 1).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp = _load(numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1), bits, k // block)
        zp = zp.reshape(n, k // block, 1)
    else:
        zp = float(1 << (bits - 1))
    built = ((codes - zp) * scale).reshape(n, k)
    tb = target.block
    want = ((target.codes.reshape(n, k // tb, tb).astype(np.float32) - target.zero_point[..., None])
            * target.scale[..., None] + target.offset[..., None]).reshape(n, k)
    error = np.linalg.norm(built - want) / max(np.linalg.norm(want), 1e-12)
    if error > 0.3:
        raise ExportError(f"{node.name} does not hold the grid's matrix (relative difference {error:.2f})",
                          node.name, "the grid and the ONNX model come from different models")


def read_grid(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per body MatMulNBits node: codes, scale, integer zero point and offset, as written, with its
    bits and block (for tests and for checking a folder against its grid)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(Path(folder) / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or not modules_of(node.name):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = attrs["N"], attrs["K"], attrs.get("bits", 4), attrs["block_size"]
        zp = inits[node.input[3]]
        entry = {"codes": _load(inits[node.input[1]], bits, block).reshape(n, k),
                 "scale": inits[node.input[2]].reshape(n, k // block),
                 "zero_point": zp.reshape(n, k // block) if zp.dtype != np.uint8
                 else _load(zp.reshape(n, -1), bits, k // block).reshape(n, k // block).astype(np.float32),
                 "bits": bits, "block": block}
        table = inits.get(f"{node.name}/grid_offset")
        entry["offset"] = table.T if table is not None else None
        found[node.name] = entry
    return found


@dataclass
class GridPlan:
    """What goes into the folder: body grids, the head's grid, and what it cost a LoRA."""

    grids: dict[str, Grid]
    head: Grid8 | None
    source: str  # "gguf" (recovered exactly), "qscale", "round-to-nearest"
    built_from: dict[str, Grid] | None = None  # the base's grids, when og built from the base (qscale)
    lora_codes_changed: float | None = None  # share of codes a merged LoRA moved
    lora_delta_rounded_away: float | None = None  # share of the LoRA's weight changes below half a step
    left_to_builder: list[str] = field(default_factory=list)  # GGUF types ftl cannot hold: og's quantiser


def _tensors(model_dir: Path, wanted) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors model whose names ``wanted(name)`` accepts, read one at a time
    (memory-mapped): the embedding and the rest of the model are never loaded."""
    from safetensors import safe_open

    from ftl.tensorfile import weight_files

    found: dict[str, torch.Tensor] = {}
    files = weight_files(model_dir)  # the weights only: not the grid sidecar, a qscale artefact or an adapter
    if not files:
        raise ExportError("no safetensors weights to take an int4 grid from", str(model_dir),
                          "save the model with safetensors (transformers' default)")
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if wanted(key):
                    found[key] = handle.get_tensor(key)
    return found


def _is_projection(name: str) -> bool:
    from ftl.quant.grid import PROJECTIONS

    parts = name.split(".")
    return name.endswith(".weight") and len(parts) > 2 and parts[-2] in PROJECTIONS


def has_grid(model_dir: Path) -> bool:
    """Whether the model has a grid to keep: one a GGUF import read from its file (any GGUF type),
    or decoder projections that lie on a Q4_1 grid (reads one tensor)."""
    from safetensors import safe_open

    from ftl.quant.gguf_grid import GRID_FILE, grid_metadata
    from ftl.quant.grid import PROJECTIONS, recover
    from ftl.tensorfile import weight_files

    if (Path(model_dir) / GRID_FILE).is_file():
        layout = json.loads(grid_metadata(model_dir).get("grids", "{}"))
        return any(name.rsplit(".", 1)[-1] in PROJECTIONS for name in layout)
    for file in weight_files(model_dir) or []:
        with safe_open(str(file), "pt") as handle:
            key = next((k for k in handle.keys() if _is_projection(k)), None)
            if key is not None:
                weight = handle.get_tensor(key)
                return weight.dim() == 2 and recover(weight) is not None
    return False


def plan_grid(model_dir: Path, base_dir: Path | None = None, qscale: Path | None = None) -> GridPlan:
    """The grid of the model in ``model_dir``: the base's own (read from its GGUF at import, any
    type; or Q4_1 recovered bit for bit from its weights; or round-to-nearest when it has none), with
    a qscale fine-tune's trained scales, or with a merged LoRA's weights put back on it (new codes,
    the base's scales). Weights are read one projection at a time; what is kept is the grids."""
    from ftl.quant.gguf_grid import GRID_FILE, projection_grids
    from ftl.quant.grid import grid_of, integer_form, load_scales, recover_q8, requantize

    base_dir = Path(base_dir) if base_dir else Path(model_dir)
    merged = base_dir.resolve() != Path(model_dir).resolve()
    known = projection_grids(base_dir)
    read_from_file = (base_dir / GRID_FILE).is_file()
    grids, exact = {}, True
    changed = rounded = built_from = None
    moved = total = below = delta_count = 0
    base_weights = _tensors(base_dir, lambda key: _is_projection(key) and key[: -len(".weight")] not in known)
    projections = sorted(set(known) | {k[: -len(".weight")] for k in base_weights})
    if not projections:
        raise ExportError("the model has no decoder projections (q_proj … down_proj) to write a grid for",
                          str(model_dir), "export with --grid builder")
    for name in projections:
        if name in known:
            grids[name] = known[name]
            continue
        w = base_weights.pop(f"{name}.weight")
        if w.shape[1] % BLOCK:
            raise ExportError(f"{name} has {w.shape[1]} inputs, not a multiple of the grid's block of {BLOCK}",
                              str(base_dir), "export with --grid builder")
        grids[name], found = grid_of(w)
        exact = exact and (found or read_from_file)
    # A GGUF import read every grid it could hold from its file; a tensor of another type (or one whose
    # grid did not verify) keeps og's own quantiser, unless qscale trained a grid for it.
    left = [] if qscale or not read_from_file else [name for name in projections if name not in known]
    for name in left:
        del grids[name]
    source = "gguf" if exact else "round-to-nearest"
    if qscale:
        built_from = dict(grids)
        trained, metadata = load_scales(qscale)
        if set(trained) != set(grids):
            raise ExportError("the qscale fine-tune's layers differ from the model's", str(qscale),
                              "export with the base model it was trained on")
        for name, parts in trained.items():
            grid = integer_form(grids[name]) if "zero_point" in parts else grids[name]
            if parts["scale"].shape != grid.scale.shape:
                raise ExportError(f"{name}: the fine-tune's grid is {tuple(parts['scale'].shape)} blocks, the "
                                  f"model's {tuple(grid.scale.shape)}", str(qscale), "export with the base it was "
                                  "trained on")
            grids[name] = replace(grid, scale=parts["scale"], minimum=parts.get("minimum"),
                                  zero_point=parts.get("zero_point"))
        source = "qscale"
    elif merged:
        for name in grids:
            w = _tensors(model_dir, lambda key, wanted=f"{name}.weight": key == wanted)[f"{name}.weight"].float()
            base = _tensors(base_dir, lambda key, wanted=f"{name}.weight": key == wanted)[f"{name}.weight"].float()
            base_grid = grids[name]
            grids[name] = requantize(w, base_grid)
            moved += int((grids[name].codes != base_grid.codes).sum())
            total += base_grid.codes.numel()
            delta = (w - base).view(w.shape[0], -1, base_grid.block)
            changed_mask = delta != 0
            below += int(((delta.abs() < base_grid.scale.float().abs()[..., None] / 2) & changed_mask).sum())
            delta_count += int(changed_mask.sum())
        changed, rounded = moved / max(1, total), below / max(1, delta_count)
    # The head's weights: lm_head's when untied, else the embedding that og ties to it.
    heads = _tensors(model_dir, lambda key: key == "lm_head.weight" or key.endswith("embed_tokens.weight"))
    head_weight = heads.get("lm_head.weight")
    if head_weight is None:
        head_weight = next((w for n, w in heads.items() if n.endswith("embed_tokens.weight")), None)
    head = recover_q8(head_weight) if head_weight is not None and head_weight.dim() == 2 else None
    return GridPlan(grids, head, source, built_from, changed, rounded, left)
