"""The one place ftl talks to the onnxruntime-genai (og) model builder, and checks what it built.

Why ftl calls og's ``parse_extra_options`` + ``create_model`` itself (from its own Olive pass,
:mod:`ftl.export.genai_pass`) instead of Olive 0.13's ``ModelBuilder`` pass: that pass was written
for og 0.14. On og >= 0.15 it imports a module og removed (``models.quantized_model``), skips
``parse_extra_options`` (og then raises, and Olive exits 0 with no model), and passes options
under their old ``int4_*`` names, which og 0.18 ignores without a word. Patching three places in
someone else's pass would break again with the next release; one function that ftl owns, tested,
and a check of the built graph after every build, catch it instead. Olive still runs the
workflow: MergeAdapterWeights, then this builder as an Olive pass.

og's options are strings (``KEY=VALUE``, as on its command line), and a wrong type is read
loosely ("false" passed where a bool is typed would be true through Olive): ftl renders typed
values itself, and :func:`verify` reads the ONNX graph to confirm block size, bits, tying and
zero points.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ftl.errors import ConfigError, OliveRunError

ALGORITHMS = ("default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last")
# rtn_last: the graph k_quant_last builds (int8 head and tied embedding, int4 body, the same names),
# quantised by round-to-nearest in 9 s instead of 43 s (SmolLM2, 2 cores). Only for an exact grid
# that overwrites every quantised weight (ftl.export.genai_pass); never offered to users.
FAST_LAST = ("rtn_last",)
# Head bits each algorithm gives (og 0.18): k_quant_last and k_quant_mixed keep the head in int8
# (k_quant_mixed some body layers too); default, rtn and k_quant are int4. A tied embedding shares
# the head's weights; an untied one stays a float Gather unless "default" quantises it to int4.
HEAD_BITS = {"default": 4, "rtn": 4, "k_quant": 4, "k_quant_last": 8, "k_quant_mixed": 8}


@dataclass
class BuildOptions:
    precision: str = "int4"
    algo_config: str = "k_quant_last"
    block_size: int = 32
    is_symmetric: bool = True
    accuracy_level: int | None = None
    op_types_to_quantize: tuple[str, ...] = ("MatMul", "Gather")
    adapter_path: str | None = None

    def pass_config(self) -> dict:
        """The FtlGenaiBuilder pass settings (Olive gives the pass its adapter through the model)."""
        values = {k: v for k, v in asdict(self).items() if v is not None and k != "adapter_path"}
        return {**values, "op_types_to_quantize": list(self.op_types_to_quantize)}

    def extra_options(self) -> list[str]:
        """og's KEY=VALUE strings, rendered from typed values (og reads "false" as false only as text)."""
        values = {"filename": "model.onnx"}
        if self.precision == "int4":
            values.update(algo_config=self.algo_config, block_size=str(self.block_size),
                          is_symmetric="true" if self.is_symmetric else "false",
                          op_types_to_quantize="/".join(self.op_types_to_quantize))
            if self.accuracy_level is not None:
                values["accuracy_level"] = str(self.accuracy_level)
        if self.adapter_path:
            values["adapter_path"] = self.adapter_path
        return [f"{key}={value}" for key, value in values.items()]


def check_options(options: BuildOptions) -> None:
    """Refuse what og builds broken, before anything runs."""
    if options.precision != "int4":
        return
    if options.algo_config not in ALGORITHMS + FAST_LAST:
        raise ConfigError(f"unknown int4 algorithm {options.algo_config!r}", "--int4-algo",
                          f"choose one of {', '.join(ALGORITHMS)}")
    if options.algo_config == "default" and not options.is_symmetric:
        raise ConfigError("int4 algorithm 'default' with --asymmetric builds an invalid model (its quantised "
                          "embedding reads the float weight)", "--int4-algo default --asymmetric",
                          "use --symmetric, or --int4-algo k_quant_last / k_quant for zero points")
    # og 0.18 runs the same k-quant method for k_quant, k_quant_last and k_quant_mixed.
    if options.algo_config.startswith("k_quant") and not options.is_symmetric and options.block_size in (64, 128):
        raise ConfigError(f"int4 algorithm '{options.algo_config}' asymmetric with --block-size {options.block_size} "
                          "crashes the builder", f"--int4-algo {options.algo_config} --asymmetric",
                          "use --block-size 32, or --symmetric")


def build(model_dir: Path, output_dir: Path, options: BuildOptions, cache_dir: Path) -> None:
    """Build an onnxruntime-genai folder from an HF model folder with og's builder."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    check_options(options)
    args = (None, str(model_dir), str(output_dir), options.precision, "cpu", str(cache_dir))
    prepared = parse_extra_options(*args, options.extra_options())
    _fit_config(prepared["hf_details"]["hf_config"])
    with k_quant_in_chunks(), quantise_one_weight_at_a_time():
        create_model(*args, **prepared)
    if not (Path(output_dir) / "model.onnx").is_file():
        raise OliveRunError("the onnxruntime-genai builder produced no model.onnx", str(output_dir),
                            "read olive.log for the builder's output")


K_QUANT_CHUNK = 1 << 21  # weights k-quantised at once: each of its ~12 temporaries is then 8-16 MB


@contextmanager
def k_quant_in_chunks():
    """While og's builder runs, onnxruntime's k-quant and round-to-nearest quantisers work on a
    weight 2M values at a time instead of all of it at once. Same codes, scales and zero points, bit
    for bit (both fit each block of 32 on its own), without a dozen full-size float32/float64
    temporaries.

    Why: ``quant_tensor_k_quant_cpu`` (onnxruntime 1.31, what ``k_quant*`` runs on a CPU) vectorises
    over the whole tensor. On Llama-3.2-1B's tied head (128256 × 2048, int8 for k_quant_last) that is
    +9 GiB at its peak for the one MatMul; on Phi-4-mini's (200064 × 3072) it would be about +22 GiB.
    The original is called on each chunk, so a change to its arithmetic in a later onnxruntime reaches
    ftl unchanged; where the module or function is missing, nothing is replaced."""
    try:
        from onnxruntime.quantization.neural_compressor import weight_only
    except ImportError:
        yield
        return
    original = getattr(weight_only, "quant_tensor_k_quant_cpu", None)
    if original is None:
        yield
        return

    import numpy as np

    def chunked(data, num_bits=4, group_size=32):
        rows, width = data.shape if data.ndim == 2 else (0, 0)
        if not rows or width % group_size:  # blocks that span rows: leave it to the original
            return original(data, num_bits, group_size)
        step = max(1, K_QUANT_CHUNK // width)
        codes, scales, zero_points = [], [], []
        for start in range(0, rows, step):
            q, scale, zero_point = original(data[start:start + step], num_bits, group_size)
            # the codes are integers 0..2^bits-1 in float64; the one caller (rtn_quantize) casts them
            # to uint8, so keeping them as uint8 saves 7 bytes a weight and changes no byte it writes
            codes.append(q.astype(np.uint8))
            scales.append(scale)
            zero_points.append(zero_point)
        return np.concatenate(codes), np.concatenate(scales), np.concatenate(zero_points)

    rtn = getattr(weight_only, "quant_tensor", None)

    def rtn_chunked(data, num_bits=4, group_size=32, scheme="asym", dtype="int", ratio=1.0):
        """Round-to-nearest (rtn, rtn_last: ftl's exact path) the same way: each block of 32 is
        scaled on its own, and its codes come back in float64, 8 bytes a weight."""
        rows, width = data.shape if data.ndim == 2 else (0, 0)
        if not rows or width % group_size:
            return rtn(data, num_bits, group_size, scheme, dtype, ratio)
        step = max(1, K_QUANT_CHUNK // width)
        parts = [rtn(data[start:start + step], num_bits, group_size, scheme, dtype, ratio)
                 for start in range(0, rows, step)]
        codes = [q.astype(np.uint8) if dtype == "uint" else q for q, _, _ in parts]  # 0..2^bits-1 when "uint"
        return np.concatenate(codes), np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])

    weight_only.quant_tensor_k_quant_cpu = chunked
    if rtn is not None:
        weight_only.quant_tensor = rtn_chunked
    try:
        yield
    finally:
        weight_only.quant_tensor_k_quant_cpu = original
        if rtn is not None:
            weight_only.quant_tensor = rtn


@contextmanager
def quantise_one_weight_at_a_time():
    """While og's builder runs, its ``Model.to_nbits`` quantises the graph one weight at a time:
    each MatMul (or Gather) with its constant weight is cut out as a one-node model, given to the
    same ``MatMulNBitsQuantizer`` with the same settings, and the nodes and initializers it returns
    are spliced back in place of the float weight, which is then dropped.

    Why: og's ``to_nbits`` (0.18) hands the quantizer ``ir.to_proto(self.model)``, the whole graph
    with every initializer materialised as float32 at once: 4 bytes a parameter on top of the loaded
    HF model that og's lazy initializers still reference (2 bytes from bf16, 4 from float32), before
    the quantizer writes a byte. Here only the weight being quantised is float32 at any moment, and
    each float weight's memory is released as its quantised form replaces it.

    The quantizer decides node by node (the share count of a weight aside, which is kept: a weight
    another node still reads stays), so the folder is the one og writes by itself, byte for byte
    (tests/test_builder_memory.py). Paths this does not reproduce (og's multi-pass "default" with
    per-node bits, exact overrides, QDQ, CUDA pre-packing) run og's own ``to_nbits``."""
    import sys

    import onnxruntime_genai.models.builder  # noqa: F401  (og puts its folder on sys.path: its modules load as "builders.*")

    base = sys.modules.get("builders.base") or sys.modules.get("onnxruntime_genai.models.builders.base")
    original = getattr(getattr(base, "Model", None), "to_nbits", None)
    if original is None:
        yield
        return

    def to_nbits(self):
        method = getattr(self, "quantization_algo", "default")
        customised = getattr(self, "int4_customized_weight_config", {}) or {}
        bits = {self.quant_attrs["bits"]} | {entry.get("bits", 4) for entry in customised.values()}
        if (getattr(self, "exact_quant_override_names", None) or getattr(self, "exact_quant_overrides", None)
                or self.quant_attrs.get("use_qdq") or getattr(self, "ep", "cpu") != "cpu"
                or (method == "default" and customised) or method not in ("default", "rtn", "k_quant")
                or not bits <= {4, 8} or _has_subgraphs(self.model.graph)):
            return original(self)
        return _to_nbits_per_weight(self, base, method, customised)

    base.Model.to_nbits = to_nbits
    try:
        yield
    finally:
        base.Model.to_nbits = original


def _to_nbits_per_weight(builder_model, base, method: str, customised: dict):
    """og's ``to_nbits`` (its single-pass branch), one weight at a time: see
    :func:`quantise_one_weight_at_a_time`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = builder_model.model
    graph = model.graph
    attrs = builder_model.quant_attrs
    algo_config = None
    if method != "default":  # as og: RTN/k_quant get every MatMul's bits spelled out
        weight_config = {node.name: {"bits": attrs["bits"]} for node in graph if node.op_type == "MatMul"}
        algo_config = builder_model.make_algo_config(method, {**weight_config, **customised})
    excluded = set(attrs["nodes_to_exclude"])
    if algo_config is None:  # what MatMulNBitsQuantizer.process does to the whole model first
        model.opset_imports["com.microsoft"] = 1
        if "Gather" in attrs["op_types_to_quantize"]:
            model.opset_imports[""] = max(model.opset_imports.get("", 21), 21)
            model.ir_version = max(model.ir_version, 10)
    appended = []
    # inputs that name a quantised weight before it exists (a tied embedding's GatherBlockQuantized
    # reads the head's codes and scales): to_proto joins them by name, so does the splice
    awaited = {value.name: value for node in graph for value in node.inputs
               if value is not None and value.producer() is None and not value.is_graph_input()
               and value.name not in graph.initializers}
    for node in list(graph):
        # rtn_quantize takes every MatMul with a constant weight, whatever the op types; the default
        # quantizer takes the op types asked for
        wanted = node.op_type == "MatMul" if algo_config is not None else node.op_type in attrs["op_types_to_quantize"]
        if not wanted or node.name in excluded:
            continue
        weight = node.inputs[0 if node.op_type == "Gather" else 1]
        if weight is None or weight.name not in graph.initializers:
            continue
        if algo_config is not None:
            quantised = _rtn_one_weight(model, node, attrs, algo_config)
        else:
            quantiser = MatMulNBitsQuantizer(
                model=_one_node_model(model, node), bits=attrs["bits"], block_size=attrs["matmul_block_size"],
                is_symmetric=attrs["is_symmetric"], accuracy_level=attrs["accuracy_level"],
                nodes_to_exclude=list(excluded), quant_format=base.QuantFormat.QOperator,
                op_types_to_quantize=attrs["op_types_to_quantize"], algo_config=None)
            quantiser.process()
            quantised = quantiser.model.model
            del quantiser
        if quantised is None or [n.op_type for n in quantised.graph.node] == [node.op_type]:  # left as it was
            continue
        appended.extend(_splice(model, node, quantised, awaited))
        del quantised  # its message holds the float weight the quantizer removed: gone before the next
    if algo_config is not None:  # onnxruntime's rtn_quantize appends its nodes, then sorts the graph
        _sort_as_rtn_quantize(graph, appended)
    else:  # and the default quantizer drops every initializer no node reads (clean_initializers)
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
    return model


def _has_subgraphs(graph) -> bool:
    import onnx_ir as ir

    return any(attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in graph for attribute in node.attributes.values())


def _sort_as_rtn_quantize(graph, appended: list) -> None:
    """Order the nodes as onnxruntime's ``rtn_quantize`` leaves a whole graph (the new nodes after
    the rest, then its ``ONNXModel.topological_sort``), so that og's own sort afterwards gives the
    same file. Its sort reads names only: it runs on a copy of the graph without weights."""
    import onnx
    from onnx_ir import serde
    from onnxruntime.quantization.neural_compressor.onnx_model import ONNXModel  # the one rtn_quantize sorts with

    new = set(appended)
    order = [node for node in graph if node not in new] + appended
    names = [f"{index}" for index in range(len(order))]
    protos = []
    for name, node in zip(names, order):
        proto = serde.serialize_node(node)
        proto.name = name
        proto.ClearField("attribute")
        protos.append(proto)
    skeleton = onnx.helper.make_graph(
        protos, "order", [onnx.helper.make_empty_tensor_value_info(value.name) for value in graph.inputs], [],
        [onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [0], []) for name in graph.initializers])
    sorter = ONNXModel(onnx.helper.make_model(skeleton))
    sorter.topological_sort()
    by_name = dict(zip(names, order))
    graph.remove(order)
    graph.extend(by_name[proto.name] for proto in sorter.model.graph.node)


def _rtn_one_weight(model, node, attrs: dict, algo_config):
    """What onnxruntime's ``rtn_quantize`` (RTN and k-quant) does to this one MatMul, with its own
    functions, on the float weight read straight from og's lazy tensor: a one-node model holding the
    MatMulNBits and its initializers. Without it, the weight would be copied into a proto, out of it,
    and copied again (``rtn_quantize`` copies what it reads): 4 copies of the largest tensor (the
    head) at once. None where ``rtn_quantize`` would do something else (not a MatMul, not 2-D, bits
    other than 4 or 8): the quantizer then runs on the one-node model."""
    import numpy as np
    from onnx_ir import serde
    from onnxruntime.quantization.neural_compressor import weight_only

    value = node.inputs[1]
    if len(value.shape or ()) != 2:  # rtn_quantize leaves it
        return None
    entry = {"bits": 4, "group_size": attrs["matmul_block_size"],  # MatMulNBitsQuantizer._generate_q4_node_config
             "scheme": "sym" if attrs["is_symmetric"] else "asym"}
    entry.update({key: v for key, v in (algo_config.customized_weight_config or {}).get(node.name, {}).items()
                  if key in entry})
    bits, group_size, scheme = entry["bits"], entry["group_size"], entry["scheme"]  # 4 or 8 (checked in to_nbits)
    weight = np.ascontiguousarray(value.const_value.numpy())  # the layout rtn_quantize reads from a proto
    shape = weight.shape
    group_size = group_size if group_size != -1 else shape[0]
    k_blocks = (shape[0] - 1) // group_size + 1
    weight = weight_only.pad_tensor(weight, group_size, k_blocks)
    if algo_config.algorithm == "k_quant":
        codes, scale, zero_point = weight_only.quant_tensor_k_quant_cuda(weight.T, bits, group_size)
    else:
        codes, scale, zero_point = weight_only.quant_tensor(weight.T, bits, group_size, scheme, "uint",
                                                            algo_config.ratios.get(value.name, 1))
    dtype = weight.dtype
    del weight
    quantised, initializers = weight_only.make_matmul_weight_only_node(
        node=serde.serialize_node(node), weight_shape=shape, num_bits=bits, group_size=group_size,
        k_blocks=k_blocks, q_weight=codes.astype("uint8"), scale=scale.astype(dtype),
        zero_point=zero_point if scheme == "asym" or algo_config.algorithm == "k_quant" else None,
        accuracy_level=attrs["accuracy_level"] if attrs["accuracy_level"] is not None else 0)
    return _part_model(model, node, [quantised], initializers)


def _one_node_model(model, node):
    """``node`` as a model of its own: its constant inputs as initializers, the rest as inputs."""
    from onnx_ir import serde

    proto = _part_model(model, node, [serde.serialize_node(node)])
    for value in node.inputs:  # written in place: make_graph would copy each weight once more
        if value is not None and value.name in model.graph.initializers:
            tensor = proto.graph.initializer.add()
            serde.serialize_tensor_into(tensor, value.const_value)
            tensor.name = value.name
    return proto


def _part_model(model, node, nodes: list, initializers=()):
    """A model of ``nodes`` (protos) in ``node``'s place: its non-constant inputs, its outputs, the
    main model's opsets and IR version."""
    import onnx
    from onnx_ir import serde

    inputs = [serde.serialize_value(value) for value in node.inputs
              if value is not None and value.name not in model.graph.initializers]
    graph = onnx.helper.make_graph(nodes, "one_node", inputs, [serde.serialize_value(v) for v in node.outputs],
                                   initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    return proto


def _splice(model, node, quantised, awaited: dict) -> None:
    """Put the nodes and new initializers of ``quantised`` (a one-node model after the quantizer) in
    place of ``node`` in ``model``; drop ``node``'s float weight unless another node reads it."""
    import onnx_ir as ir

    from onnx import TensorProto
    from onnx_ir import serde

    graph = model.graph
    part = ir.from_proto(quantised)
    for value in part.graph.initializers.values():
        # a tensor read from a proto keeps the whole message alive, and the quantizer's message still
        # holds the float weight it removed (protobuf frees a message's memory only as a whole): copy
        # each new tensor into a message of its own, so the float weight goes when this returns
        own = TensorProto()
        own.CopyFrom(serde.serialize_tensor(value.const_value))
        value.const_value = serde.TensorProtoTensor(own)
    for domain, version in part.opset_imports.items():  # what the quantizer raised, it raises here too
        if model.opset_imports.get(domain, -1) < version:
            model.opset_imports[domain] = version
    model.ir_version = max(model.ir_version, part.ir_version)
    new_nodes = list(part.graph)
    part.graph.outputs.clear()
    for new in new_nodes:
        part.graph.remove(new)
    kept = {value.name: value for value in node.inputs if value is not None}
    for value in list(part.graph.inputs):  # the activation: the main graph's value
        ir.convenience.replace_all_uses_with(value, kept[value.name])
    part.graph.inputs.clear()
    new_initializers = []
    for name in list(part.graph.initializers):
        value = part.graph.initializers.pop(name)
        if name in kept:  # the weight, left as it was (not quantised): the main graph's value
            ir.convenience.replace_all_uses_with(value, kept[name])
        else:
            new_initializers.append(value)
    outputs = {value.name: value for new in new_nodes for value in new.outputs}
    for old in node.outputs:
        outputs[old.name].type, outputs[old.name].shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, outputs[old.name], replace_graph_outputs=True)
    graph.insert_before(node, new_nodes)
    weights = [value for value in node.inputs if value is not None and value.name in graph.initializers]
    graph.remove(node, safe=True)
    for value in new_initializers:
        if value.name in graph.initializers:  # a weight two MatMuls share: quantised alike, kept once
            ir.convenience.replace_all_uses_with(value, graph.initializers[value.name])
            continue
        graph.register_initializer(value)
        if value.name in awaited:
            ir.convenience.replace_all_uses_with(awaited.pop(value.name), value)
    for value in weights:
        if not value.uses() and value.name not in {v.name for v in new_initializers}:
            graph.initializers.pop(value.name)
            value.const_value = None  # og's lazy tensor holds the HF weight: let it go
    return new_nodes


# The families ftl's tests take through every stage (tests/test_families.py, tests/test_gemma3.py).
TESTED = ("LlamaForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM")


def supported_architectures() -> set[str]:
    """The architectures the installed onnxruntime-genai builder dispatches on, read from its source,
    so the list moves with the pinned version."""
    import inspect
    import re

    from onnxruntime_genai.models import builder

    return set(re.findall(r'architectures\[0\] == "(\w+)"', inspect.getsource(builder)))


def check_architecture(model_dir: Path) -> None:
    """An architecture the builder cannot export is refused before Olive starts."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    supported = supported_architectures()
    if supported and architecture not in supported:
        from importlib.metadata import version

        raise ConfigError(f"{architecture} ({config.get('model_type')}) cannot be exported: the onnxruntime-genai "
                          f"{version('onnxruntime-genai')} model builder does not support it", str(model_dir),
                          f"export one of: {', '.join(TESTED)} (tested by ftl), or {len(supported - set(TESTED))} "
                          "more the builder knows")


def _fit_config(config) -> None:
    """Where transformers 5 and onnxruntime-genai's builder (0.18) read a config differently, give the
    builder what it reads, on the loaded config (editing config.json does not survive transformers'
    loading). Each shim says what it bridges; drop it once the builder reads transformers 5's form."""
    text = getattr(config, "text_config", None) or config
    _gemma3_rope(text)
    _phi3_rope(text)


def _gemma3_rope(text) -> None:
    """Gemma 3: transformers 5 nests the rope settings per layer type ({"full_attention": {...},
    "sliding_attention": {...}}); the builder reads a flat ``rope_parameters`` with a ``rope_type``,
    ``rope_theta`` for the global layers and ``rope_local_base_freq`` for the sliding ones."""
    rope = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict) or "rope_type" in rope or "full_attention" not in rope:
        return
    full, sliding = rope["full_attention"], rope.get("sliding_attention", rope["full_attention"])
    text.rope_parameters = dict(full)
    text.rope_theta = full.get("rope_theta", 10000.0)
    text.rope_local_base_freq = sliding.get("rope_theta", text.rope_theta)


def _phi3_rope(text) -> None:
    """Phi-3 / Phi-4-mini: the builder picks its LongRoPE graph whenever max_position_embeddings differs
    from original_max_position_embeddings (transformers 5 defaults the latter to 4096), and then reads
    the transformers 4 key ``type``. A Phi-3 without longrope scaling gets the plain graph; one with it
    gets ``type`` beside transformers 5's ``rope_type``."""
    if getattr(text, "model_type", None) != "phi3":
        return
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        text.rope_parameters = {**rope, "type": "longrope"}
    elif getattr(text, "original_max_position_embeddings", None) != text.max_position_embeddings:
        text.original_max_position_embeddings = text.max_position_embeddings


@dataclass
class Layout:
    """What an int4 folder holds, read from its graph."""

    block_size: int | None
    body_bits: list[int]
    head_bits: int | None
    embedding_bits: int | None  # None: a float embedding
    tied: bool
    zero_points: bool
    block_sizes: list[int] | None = None  # every block size in the graph (an exact Q6_K grid adds 16)

    def as_dict(self) -> dict:
        return asdict(self)


def read_layout(folder: Path) -> Layout:
    import onnx

    graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node}
    producers = {out: n for n in graph.node for out in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits"]
    head = _producer_of(producers, "logits", "MatMulNBits")
    gather = next((n for n in graph.node if n.op_type == "GatherBlockQuantized"), None)
    body = sorted({attrs[n.name].get("bits", 4) for n in matmuls if n is not head})
    blocks = {attrs[n.name].get("block_size") for n in matmuls}
    return Layout(
        block_size=next(iter(blocks)) if len(blocks) == 1 else None,
        body_bits=body,
        head_bits=attrs[head.name].get("bits", 4) if head is not None else None,
        embedding_bits=attrs[gather.name].get("bits", 4) if gather is not None else None,
        tied=head is not None and gather is not None and _shares_weights(producers, head, gather),
        zero_points=any(len(n.input) > 3 and n.input[3] for n in matmuls),
        block_sizes=sorted(b for b in blocks if b is not None),
    )


def verify(folder: Path, options: BuildOptions, tied_expected: bool, exact_grid: bool = False) -> Layout:
    """The folder is what was asked for, or a one-line error: this is what catches the next
    silent rename of a builder option."""
    layout = read_layout(folder)
    if options.precision != "int4":
        return layout
    head_bits = HEAD_BITS[options.algo_config]
    wanted = {"block size": (layout.block_size, options.block_size), "head bits": (layout.head_bits, head_bits),
              "tied embedding and head": (layout.tied, tied_expected)}
    if options.algo_config == "k_quant_mixed":
        wanted["body bits"] = (set(layout.body_bits) <= {4, 8} and 4 in layout.body_bits, True)
    else:
        wanted["body bits"] = (layout.body_bits, [4])
    if tied_expected:
        wanted["embedding bits"] = (layout.embedding_bits, head_bits)
    elif "Gather" in options.op_types_to_quantize:
        wanted["embedding bits"] = (layout.embedding_bits, 4 if options.algo_config == "default" else None)
    if exact_grid:
        wanted["zero points"] = (layout.zero_points, True)
        # A GGUF grid of more than 4 bits (Q5_0, Q6_K, Q8_0) is written as an 8-bit MatMulNBits, Q6_K's in
        # blocks of 16 (ftl.export.exact): the head keeps the block asked for.
        wanted["body bits"] = (set(layout.body_bits) <= {4, 8}, True)
        del wanted["block size"]
        wanted["block sizes"] = (set(layout.block_sizes) - {16}, {options.block_size})
    elif options.algo_config in ("default", "rtn"):
        wanted["zero points"] = (layout.zero_points, not options.is_symmetric)
    wrong = [f"{what} {got} (asked {asked})" for what, (got, asked) in wanted.items() if got != asked]
    if wrong:
        raise OliveRunError(f"the built model is not what was asked: {'; '.join(wrong)}", str(folder),
                            "the installed onnxruntime-genai builder may read these options under other names; "
                            "check its version against the pin in pyproject.toml")
    return layout


def _shares_weights(producers: dict, head, gather) -> bool:
    """The embedding reads the head's packed weights (directly or through a Reshape) and scales."""
    data = gather.input[0]
    while data in producers and producers[data].op_type == "Reshape":
        data = producers[data].input[0]
    return data == head.input[1] and gather.input[2] == head.input[2]


def _producer_of(producers: dict, output: str, op_type: str):
    """The node of ``op_type`` that feeds ``output``, through casts and reshapes."""
    seen, todo = set(), [output]
    while todo:
        name = todo.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        if node.op_type == op_type:
            return node
        seen.add(node.name)
        todo.extend(node.input[:1])
    return None
