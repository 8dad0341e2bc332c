"""``--max-ppl-increase``: export candidate settings smallest first, keep the first within budget.

Each candidate is a full export (the same Olive workflow as a plain ``ftl export-onnx``), scored by
answer perplexity on the held-out rows against the PyTorch model it comes from. The trials table
goes into the manifest and the terminal; the kept folder is an ordinary export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ftl import manifest
from ftl.errors import ConfigError, ExportError, FtlError

# Smallest first (SmolLM2-135M: about 80, 85, 92, 107 and 120 MB).
CANDIDATES: list[tuple[str, dict]] = [
    ("int4 head, block 128", {"grid": "builder", "int4_algo": "k_quant", "block_size": 128}),
    ("int4 head, block 64", {"grid": "builder", "int4_algo": "k_quant", "block_size": 64}),
    ("int4 head, block 32", {"grid": "builder", "int4_algo": "k_quant", "block_size": 32}),
    ("int8 head, block 32", {"grid": "builder", "int4_algo": "k_quant_last", "block_size": 32}),
    ("exact grid, int8 head", {"grid": "exact", "int4_algo": "k_quant_last", "block_size": 32}),
]
TRIALS = ".trials"


def candidates(qscale: bool) -> list[tuple[str, dict]]:
    """A qscale fine-tune is its grid: only the exact export keeps it."""
    return [c for c in CANDIDATES if c[1]["grid"] == "exact"] if qscale else CANDIDATES


def _folder_name(name: str) -> str:
    return name.replace(" ", "_").replace(",", "")


def source_spec(config, p) -> str:
    """The PyTorch model an export comes from, as an ``ftl eval`` spec."""
    if p.qscale:
        return f"torch:{p.qscale.parent}"
    if p.adapter:
        return f"torch:{config.adapter}"
    return f"torch:{p.model_dir}"


def answer_ppl(spec: str, rows: list[dict]) -> float:
    from ftl.eval.models import load
    from ftl.eval.stage import _ids
    from ftl.metrics import perplexity, token_nll

    model = load(spec)
    points = []
    for row in rows:
        ids, start = _ids(model, row)
        points.append(token_nll(model.logits(ids), ids, start))
    return perplexity(points)


def export_within(config, p, export_one, on_line=None):
    """Export the smallest candidate within ``config.max_ppl_increase`` of the source's perplexity."""
    from ftl.export.stage import ExportResult

    if not p.validation:
        raise ConfigError("--max-ppl-increase needs held-out rows to measure on", "--max-ppl-increase",
                          "pass --validation-data with Q/A rows the model was not trained on")
    started = time.perf_counter()
    out = Path(config.output)
    manifest.prepare_output(out, force=config.force, stage="export")
    trials_dir = out / TRIALS
    reference = answer_ppl(source_spec(config, p), p.validation)
    trials, kept = [], None
    from ftl.export.stage import block_misfits
    for name, settings in candidates(p.qscale is not None):
        if block_misfits(p.model_dir, settings["block_size"]):
            continue
        folder = trials_dir / _folder_name(name)
        trial_config = config.model_copy(update={**settings, "output": folder, "force": True,
                                                 "max_ppl_increase": None, "validation_data": None,
                                                 "max_decode_cost": None})
        try:
            result = export_one(trial_config, on_line=on_line)
        except FtlError as exc:  # a setting the builder cannot take for this model: the next one
            trials.append({"name": name, **settings, "error": exc.what[:200], "within": False, "kept": False})
            shutil.rmtree(folder, ignore_errors=True)
            continue
        ppl = answer_ppl(f"onnx:{folder}", p.validation)
        trial = {"name": name, **settings, "size_mb": result.size_mb, "ppl": ppl, "ratio": ppl / reference,
                 "within": ppl / reference <= 1 + config.max_ppl_increase, "kept": False}
        if result.trade:  # the exact grid: its decode against the same folder without offsets
            trial["decode_vs_integer_zero_points"] = result.trade["decode_vs_integer_zero_points"]
            if config.max_decode_cost is not None and \
                    1 - result.trade["decode_vs_integer_zero_points"] > config.max_decode_cost:
                trial.update(within=False, over="--max-decode-cost")
        trials.append(trial)
        if trial["within"]:
            kept = trial
            break
    warnings = []
    if kept is None:
        built = [t for t in trials if "ratio" in t]
        if not built:
            raise ExportError("no candidate export could be built", str(out), "see the trials' olive.log files")
        fast = [t for t in built if "over" not in t] or built  # a qscale fine-tune has only the exact grid
        kept = min(fast, key=lambda t: t["ratio"])
        if "over" in kept:
            warnings.append(f"{kept['name']} decodes at ×{kept['decode_vs_integer_zero_points']:.2f} of the same "
                            f"folder without offsets, over --max-decode-cost {config.max_decode_cost:.0%}; it is the "
                            "only candidate that keeps a qscale fine-tune's grid, so it is kept")
        if kept["ratio"] > 1 + config.max_ppl_increase:
            warnings.append(f"no candidate is within +{config.max_ppl_increase:.1%} of the source's perplexity; kept "
                            f"the most accurate ({kept['name']}, ×{kept['ratio']:.3f})")
    kept["kept"] = True
    chosen = trials_dir / _folder_name(kept["name"])
    for item in chosen.iterdir():
        target = out / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        shutil.move(str(item), target)
    shutil.rmtree(trials_dir, ignore_errors=True)
    from ftl.export.search import tune

    search_defaults = tune(out, p.validation)  # held-out rows are required above
    record = manifest.read(out)
    record.update(fingerprint=p.fingerprint, params=config.model_dump(mode="json", exclude={"force"}),
                  warnings=record.get("warnings", []) + warnings)
    record["outputs"].update(search_defaults=search_defaults, trials={
        "max_ppl_increase": config.max_ppl_increase, "reference_ppl": reference, "rows": len(p.validation),
        "trials": trials})
    record["timings"] = {"seconds": round(time.perf_counter() - started, 1)}
    manifest.write(out, record)
    (out / "trials.json").write_text(json.dumps(record["outputs"]["trials"], indent=1))
    return ExportResult(out, record["metrics"]["size_mb"], record["timings"]["seconds"], None,
                        record["warnings"], search_defaults=search_defaults, trials=record["outputs"]["trials"])
