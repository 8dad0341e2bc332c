#!/usr/bin/env python
"""What each stage costs per model: wall time and peak RSS of import, finetune (LoRA and qscale),
int4 export, onnxruntime-genai's builder alone and generate, each its own process under a memory
limit, against issue 26's targets. The figures behind docs/models.md.

    python bench/models.py                                     # smollm2-135m and gemma3-270m
    python bench/models.py --models llama3.2-1b --limit-gib 18 # a published shape, random bf16 weights
    python bench/models.py --models llama3.2-1b --layers 4 --stages import,export-onnx,og-builder
    python bench/models.py --models /path/to/hf-folder         # any HF folder too

Real sizes without downloads: ``llama3.2-1b``, ``qwen2.5-1.5b`` and ``phi4-mini`` are written here
from their published config.json shapes, with random weights, as sharded bf16 safetensors (what the
Hub ships), one tensor at a time. Each stage runs in its own memory cgroup (or under
``prlimit --as`` where cgroups are not writable), so an overrun fails that stage ("over N GiB")
instead of the machine. Peak RSS is the whole process tree's, sampled every 0.25 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Question: {Question}\nAnswer: {Answer}"  # for base models without a chat template
GIB = 1024 ** 3

# The published shapes (config.json on the Hub, as of 2025) of the models people fine-tune. Only the
# shapes matter here: weights are random, and the token ids are SmolLM2's (see write_random_model).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
}
QWEN_2_5_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 131072,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,  # Qwen2 has q/k/v biases: the model class adds them, the config has no key for it
}
PHI_4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
    "embd_pdrop": 0.0, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 8192, "lm_head_bias": False, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 24, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 200064,
    # longrope over the 48 rotary frequencies (3072 / 24 heads × 0.75 / 2): the published short factors
    # are 1.0; the long factors stand in with a ramp of the published range (1 → ~60), same shape.
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                     "long_factor": [round(1.0 + 59.0 * (i / 47) ** 2, 4) for i in range(48)]},
}
SHAPES = {"llama3.2-1b": LLAMA_3_2_1B, "qwen2.5-1.5b": QWEN_2_5_1_5B, "phi4-mini": PHI_4_MINI}
SHARD_BYTES = 2 * GIB  # Hub folders come in shards (of 2-5 GB); smaller ones keep the writer's peak low

STAGES = ("import", "finetune-lora", "finetune-qscale", "export-onnx", "og-builder", "generate")


# ---- random-weight models of a published shape ----

def write_random_model(name: str, folder: Path, tokenizer_from: Path, layers: int | None = None,
                       seed: int = 0) -> int:
    """Write ``name``'s published shape with random weights as sharded bf16 safetensors plus a tokenizer;
    return the parameter count. One tensor is in memory at a time (its shard's, at most SHARD_BYTES).

    The tokenizer is SmolLM2's byte-level BPE with its vocabulary padded by never-merged filler tokens
    up to the model's vocab size, so every id the random model emits decodes; its special ids (1, 2)
    go into the config. Fine for time and memory, meaningless as text."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(SHAPES[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if layers:
        shape.update(num_hidden_layers=layers, **({"max_window_layers": layers} if "max_window_layers" in shape else {}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(shape, indent=2))
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # named_parameters yields a tied head once, as the embedding: the Hub files have no lm_head either
    params = [(key, tuple(p.shape)) for key, p in model.named_parameters()]
    # random normal values drawn once and copied in from a random offset: drawing 3.8 B normals
    # one by one takes minutes on 2 cores, and the values only need to look like weights
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(1 << 24, dtype=torch.bfloat16).normal_(0.0, config.initializer_range, generator=generator)
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = folder / f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            shards.append(path)
            weight_map.update(dict.fromkeys(shard, path.name))
            shard, shard_bytes = {}, 0

    for key, dims in params:
        tensor = torch.empty(dims, dtype=torch.bfloat16)
        if key.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            _fill_from(tensor.view(-1), pool, generator)
        if shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[key] = tensor
        shard_bytes += tensor.nbytes
    flush()
    _hub_names(folder, shards, weight_map, 2 * sum(_numel(dims) for _, dims in params))  # bf16 bytes
    _write_tokenizer(tokenizer_from, folder, config.vocab_size)
    return sum(_numel(dims) for _, dims in params)


def _fill_from(flat, pool, generator) -> None:
    import torch

    position = 0
    while position < flat.numel():
        start = int(torch.randint(0, pool.numel() // 2, (1,), generator=generator))
        count = min(pool.numel() - start, flat.numel() - position)
        flat[position:position + count] = pool[start:start + count]
        position += count


def _hub_names(folder: Path, shards: list[Path], weight_map: dict, total_size: int) -> None:
    """The Hub's layout: one model.safetensors, or model-00001-of-0000N.safetensors and an index."""
    if len(shards) == 1:
        shards[0].rename(folder / "model.safetensors")
        return
    total = len(shards)
    for index, path in enumerate(shards, 1):
        path.rename(folder / f"model-{index:05d}-of-{total:05d}.safetensors")
    weight_map = {k: v.replace(".safetensors", f"-of-{total:05d}.safetensors") for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1))


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _write_tokenizer(source: Path, folder: Path, vocab_size: int) -> None:
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for index in range(len(vocab), vocab_size):
        vocab[f"<filler_{index}>"] = index
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            (folder / name).write_text((source / name).read_text())


def count_parameters(folder: Path) -> int:
    """Parameters of an HF folder from its safetensors headers (a tied head is stored once)."""
    from ftl.tensorfile import parameter_count, weight_files

    return parameter_count(weight_files(folder) or [])  # the weights only, not the grid sidecar


# ---- one process under a memory limit, its tree's RSS sampled ----

@dataclass
class Run:
    code: int
    seconds: float
    peak_mib: float
    over_limit: bool = False
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, tree RSS MiB)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (seconds, phase) from the watched logs


def _cgroup(limit_bytes: int) -> Path | None:
    """A fresh cgroup-v1 memory group below this process's own, limited to ``limit_bytes``; None where
    cgroups are not writable (then rlimit on address space stands in)."""
    try:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":", 2)[1] == "memory")
        group = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"ftl-bench-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group
    except (OSError, StopIteration):
        return None


def _oom_kills(group: Path) -> int:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return int((group / "memory.failcnt").read_text())  # old kernels: the limit was hit at least


def _tree_rss_mib(process) -> float:
    import psutil

    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2 ** 20


def run_limited(command: list[str], limit_gib: float, *, env: dict | None = None, log: Path | None = None,
                watch: list[Path] = (), markers: list[tuple[str, str]] = (), interval: float = 0.25) -> Run:
    """Run ``command`` to its end under ``limit_gib`` of memory: its exit, wall time, and the peak RSS
    of its whole process tree. Lines of ``log`` (its stdout and stderr) and of the ``watch`` files
    that match a ``markers`` regex are timestamped with that marker's phase name."""
    import psutil

    limit = int(limit_gib * GIB)
    group = _cgroup(limit)

    def enter_limit() -> None:  # in the child, before exec: everything it starts inherits the limit
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        else:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    sink = open(log, "wb") if log else subprocess.DEVNULL
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=enter_limit)
    run = Run(code=0, seconds=0.0, peak_mib=0.0)
    offsets: dict[Path, int] = {}
    patterns = [(re.compile(regex), phase) for regex, phase in markers]
    seen: set[str] = set()

    def mark_new_lines(now: float) -> None:
        for path in [*([log] if log else []), *watch]:
            try:
                with open(path, "rb") as handle:
                    handle.seek(offsets.get(path, 0))
                    chunk = handle.read()
            except OSError:
                continue
            complete = chunk.rfind(b"\n") + 1
            offsets[path] = offsets.get(path, 0) + complete
            for line in re.split(rb"[\r\n]", chunk[:complete]):
                text = line.decode("utf-8", "replace")
                for regex, phase in patterns:
                    if phase not in seen and regex.search(text):
                        seen.add(phase)
                        run.marks.append((now, phase))

    watcher = psutil.Process(process.pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = time.perf_counter() - started
            rss = _tree_rss_mib(watcher) if watcher.is_running() else 0.0
            run.samples.append((now, rss))
            run.peak_mib = max(run.peak_mib, rss)
            if patterns:
                mark_new_lines(now)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    thread.join()
    if patterns:
        mark_new_lines(time.perf_counter() - started)
    if log:
        sink.close()
    run.code = os.waitstatus_to_exitcode(status)
    run.seconds = time.perf_counter() - started
    # the sampler can miss a short spike; the kernel's high-water mark of the largest process cannot
    from ftl.system import rusage_peak_mib

    run.peak_mib = max(run.peak_mib, rusage_peak_mib(usage))
    if group is not None:
        run.over_limit = run.code != 0 and _oom_kills(group) > 0
        _remove_cgroup(group)
    else:
        run.over_limit = run.code != 0 and run.peak_mib > 0.9 * limit / 2 ** 20
    return run


def _remove_cgroup(group: Path) -> None:
    for _ in range(50):  # the group can be removed once its last process has been reaped
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


# ---- the stages ----

def ftl(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftl", *args]


def og_builder_alone(model_dir: Path, out: Path) -> list[str]:
    """onnxruntime-genai's builder on the imported folder with the options ``ftl export-onnx`` passes
    (ftl.export.builder.build: og's parse_extra_options + create_model, no Olive, no merge)."""
    code = ("import sys; from pathlib import Path; from ftl.export.builder import BuildOptions, build; "
            "build(Path(sys.argv[1]), Path(sys.argv[2]), BuildOptions(), Path(sys.argv[2]) / 'cache')")
    return [sys.executable, "-c", code, str(model_dir), str(out)]


def measure(model: str, tmp: Path, args, params: int | None) -> list[dict]:
    env = dict(os.environ, FTL_MODELS_DIR=str(tmp / "models"), HF_HUB_OFFLINE="1")
    name = Path(model).name
    data = str(ROOT / "data/quickstart/train.jsonl")
    rows: list[dict] = []

    def stage(label: str, command: list[str], out: Path | None = None) -> Run | None:
        if label.split(" ")[0] not in args.stages:
            return None
        run = run_limited(command, args.limit_gib, env=env, log=tmp / f"{label.split(' ')[0]}.log")
        row = {"stage": label, "seconds": run.seconds, "peak_mib": run.peak_mib, "code": run.code,
               "over_limit": run.over_limit}
        if out is not None and out.is_dir():
            from ftl.system import folder_size_mb

            row["size_mb"] = folder_size_mb(out)
        if run.code:
            row["error"] = f"over {args.limit_gib:g} GiB" if run.over_limit else \
                f"exit {run.code}: see {tmp / (label.split(' ')[0] + '.log')}"
        rows.append(row)
        return run

    stage("import", ftl("models", "import", model, "--name", name))
    imported = tmp / "models" / name
    params = params or (count_parameters(imported) if imported.is_dir() else None)
    config = imported / "tokenizer_config.json"
    template = [] if config.is_file() and "chat_template" in config.read_text() or \
        (imported / "chat_template.jinja").is_file() else ["--text-template", TEMPLATE]
    train = ["--model", name, "--data", data, "--max-steps", str(args.steps), "--batch-size", "2", "--no-track",
             *template]
    stage(f"finetune-lora ({args.steps} steps)", ftl("finetune", *train, "--output", str(tmp / "ft-lora")))
    stage(f"finetune-qscale ({args.steps} steps)",
          ftl("finetune", *train, "--method", "qscale", "--output", str(tmp / "ft-qscale")))
    stage("export-onnx (LoRA merged)", ftl("export-onnx", "--adapter", str(tmp / "ft-lora"), "--output",
                                           str(tmp / "onnx"), "--no-track"), out=tmp / "onnx")
    stage("og-builder (alone)", og_builder_alone(imported, tmp / "og"), out=tmp / "og")
    gguf_grid = (imported / "gguf_grid.safetensors").is_file()
    if gguf_grid and "export-onnx" in args.stages:  # what the export wrote before issue 26: og's quantiser
        stage("export-onnx --grid builder", ftl("export-onnx", "--adapter", str(tmp / "ft-lora"), "--output",
                                                str(tmp / "onnx-builder"), "--grid", "builder", "--no-track"),
              out=tmp / "onnx-builder")
    folders = {"generate": tmp / "onnx"}
    if gguf_grid:
        folders["generate --grid builder"] = tmp / "onnx-builder"
    for label, folder in folders.items():
        if "generate" not in args.stages or not folder.is_dir():
            continue
        answer = tmp / "answer.json"
        command = ftl("generate", str(folder), "What is the capital of France?", "--max-new-tokens", "32",
                      "--json")
        run = run_limited(["sh", "-c", f"{shlex.join(command)} > {shlex.quote(str(answer))}"], args.limit_gib,
                          env=env, log=tmp / "generate.log")
        row = {"stage": "generate", "seconds": run.seconds, "peak_mib": run.peak_mib, "code": run.code,
               "over_limit": run.over_limit}
        if run.code == 0:
            from ftl.system import decode_rate

            result = json.loads(answer.read_text())
            row["stage"] = f"{label} ({result['new_tokens']} tokens)"
            row["decode"] = decode_rate(result["new_tokens"], result["ttft_s"], result["total_s"])
        else:
            row["error"] = f"over {args.limit_gib:g} GiB" if run.over_limit else f"exit {run.code}"
        rows.append(row)
    for row in rows:
        row["params"] = params
        if row["stage"].startswith("export-onnx") and imported.is_dir():
            from ftl.export.stage import export_memory_gib
            from ftl.tensorfile import weight_files, weight_summary

            row["estimate_gib"] = export_memory_gib(*weight_summary(weight_files(imported)))
    if gguf_grid and (tmp / "onnx-builder").is_dir() and (tmp / "onnx").is_dir():
        rows.append(int4_ratios(imported, tmp))
    return rows


def int4_ratios(imported: Path, tmp: Path) -> dict:
    """int4/PyTorch perplexity of the LoRA's export on the validation rows, as the e2e tests score it:
    og's quantiser (before issue 26) and the model's own GGUF grids (after)."""
    from ftl import metrics
    from ftl.generate import OnnxChatModel

    rows = [json.loads(line) for line in (ROOT / "data/quickstart/validation.jsonl").read_text().splitlines()]
    model = OnnxChatModel(tmp / "onnx")
    sequences = [model.prompt_ids(model.format.conversation(r["Question"], r["Answer"])) for r in rows]
    reference = metrics.torch_perplexity(metrics.load_merged_torch(imported, tmp / "ft-lora" / "adapter"), sequences)
    before = metrics.onnx_perplexity(tmp / "onnx-builder", sequences) / reference
    after = metrics.onnx_perplexity(tmp / "onnx", sequences) / reference
    return {"stage": f"int4 / PyTorch perplexity, {len(rows)} validation rows", "ratio_before": before,
            "ratio_after": after, "seconds": 0.0, "peak_mib": 0.0, "code": 0, "over_limit": False,
            "params": None}


def targets(rows: list[dict], params: int | None) -> None:
    """Each row's ratio to issue 26's target (≤ 1.00 meets it)."""
    og = next((r for r in rows if r["stage"].startswith("og-builder") and not r["code"]), None)
    for row in rows:
        key = row["stage"].split(" ")[0]
        if key == "import":
            row["target"] = (row["peak_mib"] / 2048, "RSS / 2 GiB")
        elif key == "export-onnx" and params:
            limit = (4 * params + 2 * GIB) / 2 ** 20
            row["target"] = (row["peak_mib"] / limit, f"RSS / (4 B/param + 2 GiB = {limit / 1024:.1f} GiB)")
            if og:
                row["time_target"] = (row["seconds"] / (2 * og["seconds"]), "time / (2 × og alone)")
            if row.get("estimate_gib") and not row["code"]:
                row["estimate"] = (row["estimate_gib"] * 1024 / row["peak_mib"], "ftl's estimate / RSS")
        elif key.startswith("finetune-") and params and not row["code"]:
            from ftl.finetune.stage import training_memory_gib

            estimate = training_memory_gib(params, key.removeprefix("finetune-"))
            row["estimate"] = (estimate * 1024 / row["peak_mib"], "ftl's estimate / RSS (target 0.8-1.2)")


def machine() -> str:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    from ftl.system import default_threads

    return f"{cpu}, {default_threads()} cores, {ram:.0f} GiB RAM, Python {platform.python_version()}"


def tokenizer_source(tmp: Path, given: Path | None) -> Path:
    """SmolLM2's tokenizer files: given, or imported offline from the embedded default model."""
    if given:
        return given
    env = dict(os.environ, FTL_MODELS_DIR=str(tmp / "tok"), HF_HUB_OFFLINE="1")
    subprocess.run(ftl("models", "import", "smollm2-135m"), env=env, check=True, stdout=subprocess.DEVNULL)
    return tmp / "tok" / "smollm2-135m"


def print_table(model: str, rows: list[dict], console) -> None:
    from rich.table import Table

    params = rows[0]["params"] if rows else None
    title = f"{model}" + (f" ({params / 1e9:.2f} B parameters)" if params else "")
    table = Table("stage", "seconds", "peak RSS GiB", "B/param", "target ratio", "folder MB", "decode", title=title)
    for row in rows:
        if "ratio_after" in row:
            table.add_row(row["stage"], "", "", "", f"×{row['ratio_before']:.3f} with og's quantiser (before), "
                          f"×{row['ratio_after']:.3f} on the GGUF's own grids (after)", "", "")
            continue
        bpp = row["peak_mib"] * 2 ** 20 / params if params else None
        ratios = [f"{row[k][0]:.2f} ({row[k][1]})" for k in ("target", "time_target", "estimate") if k in row]
        decode = row.get("decode")
        table.add_row(row["stage"], f"{row['seconds']:.1f}",
                      row.get("error") or f"{row['peak_mib'] / 1024:.2f}",
                      f"{bpp:.1f}" if bpp and not row.get("error") else "", "; ".join(ratios),
                      f"{row['size_mb']:.0f}" if row.get("size_mb") else "",
                      f"{decode:.1f} tok/s" if decode else "")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m",
                        help=f"ftl model names, HF folders, or published shapes: {', '.join(SHAPES)}")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=2, help="fine-tune steps (2 rows each)")
    parser.add_argument("--limit-gib", type=float, default=18.0, help="memory limit of each stage's process tree")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the published shape (per-layer cost)")
    parser.add_argument("--tokenizer-from", type=Path, help="a folder with SmolLM2's tokenizer.json "
                                                            "(default: import smollm2-135m offline)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep the files (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.stages = set(args.stages.split(","))
    from rich.console import Console

    console = Console(width=160)
    console.print(f"[bold]machine:[/] {machine()}; each stage limited to {args.limit_gib:g} GiB")
    results = {}
    for model in args.models.split(","):
        with (contextlib.nullcontext(str(args.keep / Path(model).name)) if args.keep
              else tempfile.TemporaryDirectory()) as tmp:
            tmp = Path(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
            params = None
            if model in SHAPES:
                folder = tmp / "hf" / (model + (f"-{args.layers}l" if args.layers else ""))
                started = time.perf_counter()
                params = write_random_model(model, folder, tokenizer_source(tmp, args.tokenizer_from), args.layers)
                console.print(f"{model}: wrote {params / 1e9:.2f} B random bf16 parameters in "
                              f"{time.perf_counter() - started:.0f} s")
                model = str(folder)
            rows = measure(model, tmp, args, params)
            targets(rows, rows[0]["params"] if rows else None)
            print_table(Path(model).name, rows, console)
            results[Path(model).name] = rows
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "limit_gib": args.limit_gib, "models": results},
                                        indent=1))


if __name__ == "__main__":
    main()
