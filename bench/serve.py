#!/usr/bin/env python
"""ftl serve under load: 1, 4 and 16 concurrent streaming clients (the openai client, in a separate
process), side by side in one run, against single-stream `ftl generate` on the same export.

Prints aggregate completion tokens/s, TTFT p50/p95, end-to-end latency p50/p95/p99, errors (429s
from the bounded queue on their own line), the ratios the serve issue targets, and, with
--separate-export (an export made with --keep-adapter-separate), what serving a separate adapter
costs in decode speed. When ``llama_cpp`` is importable, its server on the default GGUF is driven
the same way (optional; never a dependency).

    python bench/serve.py --export runs/quickstart/export
    python bench/serve.py --export runs/quickstart/export --separate-export runs/sep/export
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console(width=170)


# -- the client process ---------------------------------------------------------------------------------------------

async def _clients(url: str, model: str, clients: int, per_client: int, max_tokens: int, questions: list[str]) -> dict:
    from openai import AsyncOpenAI, RateLimitError

    client = AsyncOpenAI(base_url=url, api_key=os.environ.get("FTL_API_KEY", "unused"), max_retries=0, timeout=600)
    results: list[dict] = []

    async def one(index: int) -> None:
        for k in range(per_client):
            question = questions[(index * per_client + k) % len(questions)]
            started = time.perf_counter()
            first, tokens = None, 0
            try:
                stream = await client.chat.completions.create(
                    model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": question}])
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter()
                    if chunk.usage:
                        tokens = chunk.usage.completion_tokens
                results.append({"ok": True, "ttft": (first or time.perf_counter()) - started,
                                "latency": time.perf_counter() - started, "tokens": tokens})
            except RateLimitError:
                results.append({"ok": False, "kind": "429"})
            except Exception as exc:  # noqa: BLE001 — counted, and the first few printed
                results.append({"ok": False, "kind": type(exc).__name__, "message": str(exc)[:200]})

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    return {"wall": time.perf_counter() - started, "results": results}


def client_main(args: list[str]) -> None:
    spec = json.loads(args[0])
    print(json.dumps(asyncio.run(_clients(**spec))))


# -- the driver -----------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stdout.read() if process.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"no answer from {url} in {seconds:.0f} s")


def drive(url: str, model: str, clients: int, per_client: int, max_tokens: int, questions: list[str]) -> dict:
    spec = {"url": url, "model": model, "clients": clients, "per_client": per_client, "max_tokens": max_tokens,
            "questions": questions}
    done = subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)], capture_output=True, text=True,
                          check=True)
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    ok = [r for r in raw["results"] if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)
    latency = sorted(r["latency"] for r in ok)
    return {"clients": clients, "requests": len(raw["results"]), "ok": len(ok), "tokens": tokens,
            "agg_tps": tokens / raw["wall"], "ttft": ttft, "latency": latency,
            "429": sum(1 for r in raw["results"] if r.get("kind") == "429"),
            "errors": [r for r in raw["results"] if not r["ok"] and r.get("kind") != "429"],
            "decode_tps": statistics.median((r["tokens"] - 1) / (r["latency"] - r["ttft"]) for r in ok
                                            if r["tokens"] > 1 and r["latency"] > r["ttft"]) if ok else 0.0}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def generate_decode(export: Path, questions: list[str], max_tokens: int, threads: int) -> float:
    """Single-stream decode tokens/s of ftl generate's engine, in its own process (median over prompts)."""
    code = ("import json, sys, statistics; from ftl.generate import OnnxChatModel\n"
            "m = OnnxChatModel(sys.argv[1], threads=int(sys.argv[4])); qs = json.loads(sys.argv[2]); n = int(sys.argv[3])\n"
            "m.ask(qs[0], max_new_tokens=8)\n"
            "rates = [r for r in (m.ask(q, max_new_tokens=n).decode_tokens_per_s for q in qs) if r]\n"
            "print(statistics.median(rates))")
    done = subprocess.run([sys.executable, "-c", code, str(export), json.dumps(questions), str(max_tokens),
                           str(threads)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def og_batches(export: Path, threads: int, sizes=(1, 2, 4, 8), tokens: int = 128) -> dict[int, float]:
    """The ceiling batching could reach: onnxruntime-genai's own static batch of one prompt, tokens/s."""
    code = ("import sys, time, numpy as np, onnxruntime_genai as og; from ftl.generate.engine import load_og_model\n"
            "m, _ = load_og_model(sys.argv[1], int(sys.argv[2])); n = int(sys.argv[3])\n"
            "ids = list(og.Tokenizer(m).encode('Tell me a story about a lighthouse keeper and the sea.'))\n"
            "for bs in [1] + [int(x) for x in sys.argv[4:]]:\n"
            "    p = og.GeneratorParams(m); p.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n,"
            " do_sample=False, batch_size=bs)\n"
            "    g = og.Generator(m, p); t = time.perf_counter(); g.append_tokens(np.array([ids] * bs, dtype=np.int32))\n"
            "    k = 0\n"
            "    while not g.is_done(): g.generate_next_token(); k += 1\n"
            "    print(bs, bs * k / (time.perf_counter() - t))\n")
    done = subprocess.run([sys.executable, "-c", code, str(export), str(threads), str(tokens), *map(str, sizes)],
                          capture_output=True, text=True, check=True)
    rows = [line.split() for line in done.stdout.strip().splitlines()][1:]  # the first is a warm-up
    return {int(size): float(rate) for size, rate in rows}


def serve_and_drive(export: Path, loads: list[int], per_client: int, max_tokens: int, questions: list[str],
                    threads: int, concurrency: int, extra: list[str] = (), model: str | None = None) -> list[dict]:
    port = free_port()
    command = [sys.executable, "-m", "ftl.cli", "serve", str(export), "--port", str(port), "--threads", str(threads),
               "--max-concurrency", str(concurrency), "--max-queue", "64", *extra]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "FTL_API_KEY": ""})
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server)
        name = model or json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())["data"][0]["id"]
        drive(f"http://127.0.0.1:{port}/v1", name, 1, 1, 8, questions)  # warm-up
        return [drive(f"http://127.0.0.1:{port}/v1", name, n, per_client, max_tokens, questions) for n in loads]
    finally:
        server.terminate()
        server.wait(timeout=30)


def llama_cpp_drive(loads: list[int], per_client: int, max_tokens: int, questions: list[str],
                    threads: int) -> list[dict]:
    """llama-cpp-python's own OpenAI-compatible server on the default model's GGUF (the file ftl imports
    SmolLM2 from), driven by the same clients."""
    from ftl.models.store import builtin_gguf

    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(builtin_gguf("smollm2-135m")),
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048",
               "--model_alias", "gguf"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/v1/models", server)
        drive(f"http://127.0.0.1:{port}/v1", "gguf", 1, 1, 8, questions)  # warm-up
        return [drive(f"http://127.0.0.1:{port}/v1", "gguf", n, per_client, max_tokens, questions) for n in loads]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=REPO / "runs" / "quickstart" / "export")
    parser.add_argument("--separate-export", type=Path, help="an export made with --keep-adapter-separate")
    parser.add_argument("--loads", default="1,4,16")
    parser.add_argument("--per-client", type=int, default=3, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=4, help="ftl serve --max-concurrency")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not (args.export / "genai_config.json").is_file():
        raise SystemExit(f"{args.export} is not an export: run `ftl run pipelines/quickstart.yaml` first, or pass --export")
    from ftl.manifest import hardware

    questions = [json.loads(line)["Question"] for line in (REPO / "data/quickstart/test.jsonl").read_text().splitlines()]
    loads = [int(n) for n in args.loads.split(",")]
    console.print(f"[bold]ftl serve[/] {args.export} on {hardware()}; {args.threads} threads, "
                  f"--max-concurrency {args.concurrency}, {args.per_client} requests per client, "
                  f"max_tokens {args.max_tokens}, streaming, greedy", highlight=False)
    # ftl generate before and after the server runs: this VM's speed drifts, and the ratio takes the mean.
    before = generate_decode(args.export, questions[:4], args.max_tokens, args.threads)
    runs = {"ftl serve": serve_and_drive(args.export, loads, args.per_client, args.max_tokens, questions,
                                         args.threads, args.concurrency)}
    after = generate_decode(args.export, questions[:4], args.max_tokens, args.threads)
    single = (before + after) / 2
    if args.separate_export:
        adapter = sorted(args.separate_export.glob("*.onnx_adapter"))[0]
        runs["ftl serve, separate adapter"] = serve_and_drive(
            args.separate_export, [1], args.per_client, args.max_tokens, questions, args.threads, args.concurrency,
            ["--adapter", f"lora={adapter}"], model="lora")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        console.print("llama.cpp: llama_cpp is not importable here; its server is not compared (optional)")
    else:
        runs["llama.cpp server (GGUF)"] = llama_cpp_drive(loads, args.per_client, args.max_tokens, questions,
                                                          args.threads)

    table = Table("server", "clients", "ok/requests", "429", "errors", "agg tok/s", "× 1 client", "decode tok/s",
                  "TTFT p50", "TTFT p95", "latency p50", "p95", "p99", title="streaming clients")
    for name, rows in runs.items():
        base = rows[0]["agg_tps"]
        for row in rows:
            table.add_row(name, str(row["clients"]), f"{row['ok']}/{row['requests']}", str(row["429"]),
                          str(len(row["errors"])), f"{row['agg_tps']:.1f}", f"{row['agg_tps'] / base:.2f}",
                          f"{row['decode_tps']:.1f}", f"{pct(row['ttft'], .5):.3f}s", f"{pct(row['ttft'], .95):.3f}s",
                          f"{pct(row['latency'], .5):.2f}s", f"{pct(row['latency'], .95):.2f}s",
                          f"{pct(row['latency'], .99):.2f}s")
    console.print(table)
    served = runs["ftl serve"]
    one = served[0]
    console.print(f"single stream: ftl serve decodes at {one['decode_tps']:.1f} tok/s, ftl generate at {single:.1f} "
                  f"(before {before:.1f}, after {after:.1f}) → {one['decode_tps'] / single:.2f}× (target ≥ 0.90)",
                  highlight=False)
    for row in served[1:]:
        console.print(f"{row['clients']} clients: aggregate {row['agg_tps'] / one['agg_tps']:.2f}× one client; "
                      f"{len(row['errors'])} errors, {row['429']} × 429", highlight=False)
    if args.separate_export:
        sep = runs["ftl serve, separate adapter"][0]
        console.print(f"separate adapter: decode {sep['decode_tps']:.1f} tok/s vs merged {one['decode_tps']:.1f} "
                      f"→ {sep['decode_tps'] / one['decode_tps']:.2f}×", highlight=False)
    ceiling = og_batches(args.export, args.threads)
    console.print("onnxruntime-genai static batches, one prompt × batch, 128 tokens: " + ", ".join(
        f"batch {size} {rate:.1f} tok/s ({rate / ceiling[1]:.2f}×)" for size, rate in ceiling.items()),
        highlight=False)
    for row in [r for rows in runs.values() for r in rows]:
        for error in row["errors"][:3]:
            console.print(f"error ({row['clients']} clients): {error['kind']}: {error.get('message', '')}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--client":
        client_main(sys.argv[2:])
    else:
        main()
