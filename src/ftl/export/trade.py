"""What the exact grid costs and buys, measured on the exported folder itself.

The exact form keeps the model's grid bit for bit by adding each block's offset back (12 small
nodes a layer on SmolLM2). The same folder with those nodes dropped is the integer zero-point grid
at the builder's node count and speed. Timing the two side by side on this machine gives the
decode cost of exactness; with held-out rows, their answer perplexities give what it buys. The
export records both (``outputs.exact_trade``) and prints them in one line; ``--max-decode-cost``
acts on the cost.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from pathlib import Path

TWIN = ".without-offsets"
QUESTION = "Explain in two sentences what a CPU cache is and why it makes programs faster."


def has_offsets(folder: Path) -> bool:
    import onnx

    graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    return any(node.name.endswith("/grid_offset/Add") for node in graph.node)


def without_offsets(src: Path, dst: Path) -> Path:
    """A copy of the folder whose MatMulNBits keep their integer zero points and lose the offset
    correction: the grid rounded to integer zero points, at the builder's node count."""
    import onnx

    from ftl.export.exact import save_model

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(TWIN, "*.log", ".trials", "model.onnx", "model.onnx.data"))
    model = onnx.load(str(Path(src) / "model.onnx"))
    graph = model.graph
    rename, kept = {}, []
    for node in graph.node:
        if "/grid_offset/" in node.name or "/grid_block_sums/" in node.name:
            if node.op_type == "Add":
                rename[node.input[0]] = node.output[0]
            continue
        kept.append(node)
    for node in kept:
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)
    used = {name for node in kept for name in node.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    save_model(model, dst)
    return dst


def _seconds_per_token(folder: Path, questions: list[str], tokens: int) -> float:
    """One session at a time (an idle session's pool threads would spin on the same cores)."""
    import onnxruntime_genai as og

    from ftl.generate import OnnxChatModel

    model = OnnxChatModel(folder)
    spent = made = 0
    for i, question in enumerate([questions[0]] + questions):  # the first is a warm-up
        ids = model.prompt_ids(model.format.conversation(question))
        params = og.GeneratorParams(model.model)
        # at least a sliding window's KV cache (og 0.18 sizes it from max_length: Gemma 3's 512)
        params.set_search_options(max_length=max(len(ids) + tokens, model.min_length),
                                  min_length=len(ids) + tokens, do_sample=False)
        generator = og.Generator(model.model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        started = time.perf_counter()
        count = 0
        while count < tokens - 1 and not generator.is_done():
            generator.generate_next_token()
            count += 1
        if i:
            spent += time.perf_counter() - started
            made += count
    del generator, model
    gc.collect()
    return spent / max(1, made)


def measure(folder: Path, rows: list[dict] | None = None, rounds: int = 3, prompts: int = 2,
            tokens: int = 32) -> dict:
    """Decode of the exact folder over its offset-free twin (median of per-round ratios, the two
    taking turns) and, with held-out rows, both answer perplexities."""
    from ftl.manifest import hardware
    from ftl.system import default_threads

    folder = Path(folder)
    twin = folder / TWIN
    shutil.rmtree(twin, ignore_errors=True)
    try:
        without_offsets(folder, twin)
        questions = [r["question"] for r in (rows or [])[:prompts]] or [QUESTION]
        ratios = []
        for turn in range(rounds):
            pair = [folder, twin] if turn % 2 == 0 else [twin, folder]
            seconds = {p: _seconds_per_token(p, questions, tokens) for p in pair}
            ratios.append(seconds[twin] / seconds[folder])
        trade = {"decode_vs_integer_zero_points": round(statistics.median(ratios), 3),
                 "rounds": [round(r, 3) for r in ratios], "tokens": tokens, "prompts": len(questions),
                 "threads": default_threads(), "hardware": hardware()}
        if rows:
            from ftl.export.choose import answer_ppl

            exact, rounded = answer_ppl(f"onnx:{folder}", rows), answer_ppl(f"onnx:{twin}", rows)
            trade.update(ppl_exact=round(exact, 4), ppl_integer_zero_points=round(rounded, 4),
                         ppl_ratio=round(exact / rounded, 4), rows=len(rows))
        return trade
    finally:
        shutil.rmtree(twin, ignore_errors=True)


def line(trade: dict) -> str:
    """The trade in one line, for the terminal."""
    text = (f"exact grid: the model's own grid, bit for bit, decoding at ×{trade['decode_vs_integer_zero_points']:.2f} "
            f"the speed of the same folder without its offsets")
    if "ppl_ratio" in trade:
        text += (f", at ×{trade['ppl_ratio']:.3f} its answer perplexity ({trade['ppl_exact']:.3f} vs "
                 f"{trade['ppl_integer_zero_points']:.3f} on {trade['rows']} held-out rows)")
    return text + "; --grid builder trades exactness for that speed, --max-decode-cost decides by itself"
