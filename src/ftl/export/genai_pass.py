"""``FtlGenaiBuilder``: ftl's own Olive pass around the onnxruntime-genai model builder.

Olive runs it after MergeAdapterWeights, from the package config ftl passes to ``olive run``
(:func:`ftl.olive.package_config`). Why ftl owns this pass rather than using Olive 0.13's
``ModelBuilder``: see :mod:`ftl.export.builder`. Imported only inside Olive's process.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import HfModelHandler, ONNXModelHandler
from olive.passes import Pass
from olive.passes.olive_pass import PassConfigParam

from ftl.export.builder import BuildOptions, build
from ftl.export.exact import GRID_RECORD, plan_grid, write_grid


class FtlGenaiBuilder(Pass):
    """Build an onnxruntime-genai folder (int4 or fp32) from an HF model with og's builder."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        defaults = BuildOptions()
        return {
            "precision": PassConfigParam(type_=str, default_value=defaults.precision, description="int4 or fp32"),
            "algo_config": PassConfigParam(type_=str, default_value=defaults.algo_config,
                                           description="og's int4 algorithm"),
            "block_size": PassConfigParam(type_=int, default_value=defaults.block_size, description="int4 block"),
            "is_symmetric": PassConfigParam(type_=bool, default_value=defaults.is_symmetric,
                                            description="int4 without zero points"),
            "accuracy_level": PassConfigParam(type_=Optional[int], default_value=None,
                                              description="MatMulNBits accuracy level"),
            "op_types_to_quantize": PassConfigParam(type_=list[str], default_value=list(defaults.op_types_to_quantize),
                                                    description="ops quantised"),
            "grid": PassConfigParam(type_=str, default_value="builder",
                                    description="exact: write the model's int4 grid bit for bit (ftl.export.exact); "
                                                "builder: og's own quantiser"),
            "grid_form": PassConfigParam(type_=str, default_value="offset", description="offset or float-zp"),
            "grid_base": PassConfigParam(type_=Optional[str], default_value=None,
                                         description="the base a merged LoRA is put back on the grid of"),
            "qscale_path": PassConfigParam(type_=Optional[str], default_value=None,
                                           description="a qscale fine-tune's trained scales"),
        }

    @staticmethod
    def is_accelerator_agnostic(accelerator_spec: AcceleratorSpec) -> bool:
        return False

    def _run_for_config(self, model: HfModelHandler, config, output_model_path: str) -> ONNXModelHandler:
        if not isinstance(model, HfModelHandler):
            raise ValueError("FtlGenaiBuilder builds from an HF model")
        out = Path(output_model_path)
        out.mkdir(parents=True, exist_ok=True)
        grid_keys = ("grid", "grid_form", "grid_base", "qscale_path")
        settings = {name: getattr(config, name) for name in self._default_config(None) if name not in grid_keys}
        options = BuildOptions(**{**settings, "op_types_to_quantize": tuple(settings["op_types_to_quantize"])},
                               adapter_path=str(model.adapter_path) if model.adapter_path else None)
        plan = None
        if config.grid == "exact":
            plan = plan_grid(Path(model.model_name_or_path), Path(config.grid_base) if config.grid_base else None,
                             Path(config.qscale_path) if config.qscale_path else None)
            if options.algo_config == "k_quant_last" and plan.head is not None and not plan.left_to_builder:
                # Every weight the builder quantises is overwritten below (body grids, Q8_0 head), so
                # its quantiser is wasted work: the same graph from round-to-nearest, 5x faster.
                # (asymmetric, so the int8 head has the zero points that k_quant gives it either way)
                options = replace(options, algo_config="rtn_last", is_symmetric=False)
        build(Path(model.model_name_or_path), out, options, cache_dir=out.parent / "genai-builder-cache")
        if plan is not None:
            body = _int4_matmuls(out / "model.onnx")
            written = write_grid(out, plan.grids, config.grid_form, plan.head, plan.built_from, plan.left_to_builder)
            if options.algo_config == "rtn_last" and (not written.head or written.matrices + written.packed != body):
                raise ValueError(f"the fast build's weights were not all overwritten ({written.matrices} of {body} "
                                 f"int4 MatMuls, head {written.head})")
            (out / GRID_RECORD).write_text(json.dumps({
                **written.as_dict(), "source": plan.source, "builder_algo": options.algo_config,
                "lora_codes_changed": plan.lora_codes_changed,
                "lora_delta_rounded_away": plan.lora_delta_rounded_away,
                "left_to_builder": plan.left_to_builder}, indent=1))
        extra = sorted(str(p) for p in out.iterdir() if p.name not in ("model.onnx", "model.onnx.data"))
        return ONNXModelHandler(out, onnx_file_name="model.onnx", model_attributes={"additional_files": extra})


def _int4_matmuls(model_path: Path) -> int:
    """The 4-bit MatMulNBits nodes of a built graph (what an exact grid must overwrite, every one)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sum(1 for node in graph.node if node.op_type == "MatMulNBits"
               and any(a.name == "bits" and helper.get_attribute_value(a) == 4 for a in node.attribute))
