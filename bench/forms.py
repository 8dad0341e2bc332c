"""The exact export's forms side by side (``python bench/decode.py --forms RUN``; issue 27).

Folders: the builder's int4 folder of the base (og's quantiser: the speed reference), the exact
export of the qscale fine-tune, and variants of that folder: graph forms written here from its
model.onnx, and onnxruntime session settings written into its genai_config.json (what og applies
to every client). Then the fine-tune as a GGUF (``ftl export-gguf``) through llama.cpp.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=180)


def _ftl(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ftl", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ftl {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def _load(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"))


def _save(model, folder: Path) -> None:
    from ftl.export.exact import save_model

    save_model(model, folder)


def _copy(src: Path, dst: Path, session: dict | None = None) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if session:
        path = dst / "genai_config.json"
        config = json.loads(path.read_text())
        config["model"]["decoder"]["session_options"].update(session)
        path.write_text(json.dumps(config, indent=4))
    return dst


def pack_gate_up(folder: Path) -> None:
    """ftl's gate/up packing (what the exact export does) applied to another folder."""
    from ftl.export.exact import pack_gate_up as pack

    model = _load(folder)
    pack(model.graph, {t.name: t for t in model.graph.initializer})
    _save(model, folder)


def unpacked_exact(builder: Path, run: Path, folder: Path) -> None:
    """The exact grid written as before packing (gate and up separate): into a copy of the builder's
    folder of the same base, which og built with the same options."""
    from ftl import manifest
    from ftl.export.exact import plan_grid, write_grid

    base = Path(manifest.read(run)["inputs"]["base_model"]["path"])
    plan = plan_grid(base, qscale=run / "qscale.safetensors")
    write_grid(folder, plan.grids, "offset", plan.head, plan.built_from, plan.left_to_builder, pack=False)


def fp16_offsets(folder: Path) -> None:
    """The offset tables stored in fp16 (a Cast back to fp32 that onnxruntime folds at load): half
    their bytes on disk; each offset moves by at most 2^-11 of itself."""
    from onnx import TensorProto, helper, numpy_helper

    model = _load(folder)
    graph = model.graph
    tables = {t.name for t in graph.initializer if t.name.endswith("/grid_offset")}
    for i, t in enumerate(graph.initializer):
        if t.name in tables:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                                                  f"{t.name}/fp16"))
    casts = [helper.make_node("Cast", [f"{name}/fp16"], [name], name=f"{name}/Cast", to=TensorProto.FLOAT)
             for name in sorted(tables)]
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    _save(model, folder)


def nodes_per_layer(folder: Path) -> int:
    return sum(1 for n in _load(folder).graph.node if "/layers.0/" in n.name)


def _ppl(spec: str, rows: list[dict]) -> float:
    from ftl.export.choose import answer_ppl

    return answer_ppl(spec, rows)


def _llama(path: Path, logits: bool = False):
    from llama_cpp import Llama

    from ftl.system import default_threads

    return Llama(model_path=str(path), n_ctx=2048, n_threads=default_threads(), logits_all=logits, verbose=False)


def _llama_seconds(llm, prompts: list[list[int]], new_tokens: int) -> float:
    """llama.cpp's seconds per token after the first, greedy, end of text banned (exactly n tokens)."""
    spent = made = 0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            scores = llm.scores[llm.n_tokens - 1].copy()
            scores[llm.token_eos()] = -np.inf
            token = int(np.argmax(scores))
            made += 1
        spent += time.perf_counter() - started
    return spent / made


def _llama_ppl(path: Path, sequences: list[tuple[list[int], int]]) -> float:
    from ftl.metrics import perplexity, token_nll

    llm = _llama(path, logits=True)
    points = []
    for ids, start in sequences:
        llm.reset()
        llm.eval(ids)
        points.append(token_nll(np.array(llm.scores[: len(ids)]), ids, start))
    return perplexity(points)


def compare_forms(run: Path, work: Path, rows: list[dict], prompts: int, new_tokens: int, rounds: int) -> None:
    from ftl import manifest
    from ftl.eval.models import load
    from ftl.eval.stage import _ids
    from ftl.export.trade import _seconds_per_token, without_offsets
    from ftl.system import default_threads, folder_size_mb

    work.mkdir(parents=True, exist_ok=True)
    record = manifest.read(run)
    base = record["inputs"]["base_model"]["path"]
    console.print(f"[bold]hardware:[/] {manifest.hardware()}; onnxruntime-genai threads {default_threads()}; "
                  f"{prompts} prompts × {new_tokens} tokens, {rounds} rounds; perplexity on {len(rows)} held-out rows")
    folders: dict[str, Path] = {}
    builder, exact = work / "builder", work / "exact"
    # without --force: a folder left by an earlier run of the same command is reused, any other is refused
    _ftl("export-onnx", "--model", base, "--grid", "builder", "--output", str(builder))
    _ftl("export-onnx", "--adapter", str(run), "--output", str(exact))
    folders["builder (og's quantiser), base"] = builder
    folders["builder: gate/up packed"] = _copy(builder, work / "builder-packed")
    pack_gate_up(folders["builder: gate/up packed"])
    folders["exact, gate/up separate (before)"] = _copy(builder, work / "unpacked")
    unpacked_exact(builder, run, folders["exact, gate/up separate (before)"])
    folders["exact (export-onnx: gate/up packed)"] = exact
    half = _copy(exact, work / "fp16")
    fp16_offsets(half)
    folders["exact: offsets stored fp16"] = half
    folders["exact: dynamic_block_base 4"] = _copy(exact, work / "dbb", {"session.dynamic_block_base": "4"})
    folders["builder: dynamic_block_base 4"] = _copy(builder, work / "builder-dbb", {"session.dynamic_block_base": "4"})
    folders["exact: 1 thread"] = _copy(exact, work / "one", {"intra_op_num_threads": 1})
    folders["builder: 1 thread"] = _copy(builder, work / "builder-one", {"intra_op_num_threads": 1})
    folders["exact: spinning off"] = _copy(exact, work / "nospin", {"session.intra_op.allow_spinning": "0"})
    shutil.rmtree(work / "no-offsets", ignore_errors=True)
    folders["exact without offsets (integer zero points only)"] = without_offsets(exact, work / "no-offsets")

    source = load(f"torch:{run}")
    rows_q = [{"question": r["Question"], "reference": r["Answer"]} for r in rows]
    sequences = [_ids(source, r) for r in rows_q]
    prompt_ids = [ids[:start] for ids, start in sequences[:prompts]]
    questions = [r["question"] for r in rows_q[:prompts]]
    torch_ppl = _ppl(f"torch:{run}", rows_q)
    times: dict[str, list[float]] = {name: [] for name in folders}
    order = list(folders)
    for turn in range(rounds):  # each round starts one folder later: no folder always runs first
        for name in order[turn % len(order):] + order[:turn % len(order)]:
            # one session at a time (an idle session's pool threads spin on the same 2 cores), after a warm-up
            times[name].append(_seconds_per_token(folders[name], questions, new_tokens))
    ref = "builder (og's quantiser), base"
    table = Table("form", "nodes / layer", "MB", "decode tok/s", "× builder", "answer ppl", "× PyTorch qscale",
                  title=f"exact export forms: PyTorch qscale ppl {torch_ppl:.3f}")
    today = "exact (export-onnx: gate/up packed)"
    same_graph = {"exact: dynamic_block_base 4": today, "exact: 1 thread": today, "exact: spinning off": today,
                  "builder: dynamic_block_base 4": ref, "builder: 1 thread": ref}  # session settings only
    ppls: dict[str, float] = {}
    for name, folder in folders.items():
        ratio = statistics.median(b / t for b, t in zip(times[ref], times[name]))
        ppl = ppls[name] = ppls[same_graph[name]] if name in same_graph else _ppl(f"onnx:{folder}", rows_q)
        table.add_row(name, str(nodes_per_layer(folder)), f"{folder_size_mb(folder):.1f}",
                      f"{1 / statistics.median(times[name]):.1f}", f"{ratio:.3f}", f"{ppl:.3f}", f"{ppl / torch_ppl:.4f}")
    console.print(table)

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        console.print("[dim]llama_cpp not importable: the GGUF rows are skipped[/]")
        return
    from ftl.export.gguf_export import source_gguf

    gguf_out = work / "gguf"
    _ftl("export-gguf", "--adapter", str(run), "--output", str(gguf_out), "--force")
    exported, original = gguf_out / "model.gguf", source_gguf(Path(base))
    paths = {"original GGUF (base)": original, "export-gguf (qscale)": exported}
    ltimes: dict[str, list[float]] = {name: [] for name in paths}
    for turn in range(rounds):
        for name in (list(paths) if turn % 2 == 0 else list(paths)[::-1]):
            llm = _llama(paths[name])
            _llama_seconds(llm, prompt_ids[:1], 8)
            ltimes[name].append(_llama_seconds(llm, prompt_ids, new_tokens))
            del llm
            gc.collect()
    table = Table("llama.cpp", "MB", "decode tok/s", "× original", "answer ppl", "× PyTorch qscale",
                  title=f"GGUF through llama.cpp {llama_cpp.__version__}")
    first = "original GGUF (base)"
    for name, path in (("original GGUF (base)", original), ("export-gguf (qscale)", exported)):
        ratio = statistics.median(b / t for b, t in zip(ltimes[first], ltimes[name]))
        ppl = _llama_ppl(path, sequences)
        table.add_row(name, f"{folder_size_mb(path):.1f}", f"{1 / statistics.median(ltimes[name]):.1f}",
                      f"{ratio:.3f}", f"{ppl:.3f}", f"{ppl / torch_ppl:.4f}")
    console.print(table)
