"""Typed settings for ``ftl export-onnx``; validated before any weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ftl.config import StrictModel

BLOCK_SIZES = (16, 32, 64, 128, 256)


class ExportConfig(StrictModel):
    adapter: Path | None = Field(None, description="A finetune output folder or a peft adapter folder")
    model: str | None = Field(None, description="Base model (default: the one the adapter was trained on)")
    output: Path = Field(description="Folder for the onnxruntime-genai model")
    precision: Literal["int4", "fp32"] = Field("int4", description="int4 for the edge; fp32 to check a model's graph "
                                                                  "against PyTorch (4× the size, no quantisation)")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 quantization block size")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gather"],
                                description="Ops quantized to int4; Gather covers the (tied) embedding")
    # k_quant_last by default: an int8 embedding and head stored once (tied) and an int4 body; it
    # measured at the quality of the old untied k_quant folder at half its size (bench/export_matrix.py).
    int4_algo: Literal["default", "rtn", "k_quant", "k_quant_mixed", "k_quant_last"] = Field(
        "k_quant_last", description="int4 algorithm of the onnxruntime-genai builder: k_quant_last keeps the "
                                    "(tied) embedding and head in int8; default/rtn/k_quant are int4 throughout "
                                    "(smaller, less accurate)")
    symmetric: bool = Field(True, description="int4 without zero points (--asymmetric adds them)")
    accuracy_level: Literal[1, 2, 3, 4] | None = Field(
        None, description="MatMulNBits accuracy level (1 fp32 … 4 int8); default: onnxruntime's choice")
    grid: Literal["exact", "builder"] | None = Field(
        None, description="exact: write the model's own int4 grid bit for bit (a GGUF Q4_1 import's, a qscale "
                          "fine-tune's, else round-to-nearest), as MatMulNBits plus a per-block offset; builder: "
                          "og's quantiser, which re-rounds every block (default: exact where the model has a grid "
                          "to keep, at blocks of 32)")
    grid_form: Literal["offset", "float-zp"] = Field(
        "offset", description="how the exact grid's float minimum is written: offset (integer zero point plus a "
                              "per-block correction) or float-zp (float zero points: exact, far slower decode)")
    validation_data: Path | None = Field(
        None, description="Held-out Q/A JSONL (never trained on): the export answers it with each search setting "
                          "(greedy, repetition penalty, no-repeat n-gram) and writes the best into genai_config.json")
    validation_limit: int = Field(16, gt=0, description="Held-out rows used to choose the search defaults and "
                                                        "to score --max-ppl-increase candidates")
    max_ppl_increase: float | None = Field(
        None, gt=0, lt=1, description="e.g. 3%: try settings smallest first (block, head bits, builder or exact "
                                      "grid) and keep the first whose held-out perplexity is within this of the "
                                      "PyTorch model's (needs --validation-data)")
    max_decode_cost: float | None = Field(
        None, gt=0, lt=1, description="e.g. 15%: the exact grid may decode at most this much slower than the same "
                                      "folder without its offsets (measured at export); beyond it a model's own "
                                      "grid is exported by og's quantiser instead (a qscale fine-tune keeps its grid, "
                                      "with a warning)")
    measure_trade: bool = Field(True, description="Time the exact grid against the same folder without its offsets "
                                                  "(and score both on --validation-data) and record it")
    keep_adapter_separate: bool = Field(False, description="Export base + .onnx_adapter for multi-LoRA serving "
                                                           "(much slower decode than a merged export)")
    force: bool = Field(False, description="Replace a finished result in the output folder")

    @field_validator("max_ppl_increase", "max_decode_cost", mode="before")
    @classmethod
    def _percent(cls, value):
        if isinstance(value, str):
            text = value.strip()
            try:
                return float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(f"{value!r} is not a percentage like 3% (or a fraction like 0.03)") from None
        return value

    @property
    def exact_grid(self) -> bool:
        """Exact unless asked otherwise or impossible; ``ftl.export.stage.resolve_grid`` also looks
        at the model (no grid to keep: the builder)."""
        if self.grid is not None:
            return self.grid == "exact"
        return self.block_size == 32 and not self.keep_adapter_separate and self.precision == "int4"
