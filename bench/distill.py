#!/usr/bin/env python
"""Distil throughput against the local OpenAI-compatible test server with a fixed per-request delay.

Prints, in one run: achieved requests/s as a fraction of the ideal (concurrency / delay), the
overhead per request, and a faulty run (10% 429 with Retry-After, 5% 500) checked for every seed
answered, rejected or left pending exactly once, with its wall time against the fault-free run.

    python bench/distill.py --seeds 200 --delay 0.1 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ftl import manifest
from ftl.distill import DistillConfig, distill

console = Console(width=140)


def run(seeds: Path, out: Path, delay: float, concurrency: int, rate_429=0.0, rate_500=0.0) -> tuple[float, dict]:
    # The server runs in its own process, as a real endpoint would: in-process it would share the GIL
    # with the client and the benchmark would measure that contention, not ftl.
    server = subprocess.Popen([sys.executable, "-m", "ftl.testing", "--delay", str(delay),
                               "--rate-429", str(rate_429), "--rate-500", str(rate_500)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        started = time.perf_counter()
        result = distill(DistillConfig(seeds=str(seeds), output=out, teacher="openai", base_url=url,
                                       model="bench", concurrency=concurrency, backoff=0.05, max_retries=8))
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()
    answered = [json.loads(line)["Question"] for line in out.read_text().splitlines()]
    rejects = out.with_name(out.stem + ".rejects.jsonl")
    rejected = [json.loads(line)["Question"] for line in rejects.read_text().splitlines()] if rejects.exists() else []
    pending = sum(result.pending.values())  # transient failures past the retries: counted, written nowhere
    requests = len(answered) + len(rejected) + pending + sum(result.retries.values())  # one first try per seed
    return wall, {"answered": answered, "rejected": rejected, "pending": pending, "requests": requests,
                  "retries": dict(result.retries)}


def bare_client_rps(count: int, delay: float, concurrency: int) -> float:
    """The same requests through the bare openai client: the ceiling ftl's own overhead is measured against."""
    import asyncio

    import openai

    server = subprocess.Popen([sys.executable, "-m", "ftl.testing", "--delay", str(delay)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()

        async def go():
            client = openai.AsyncOpenAI(api_key="unused", base_url=url, max_retries=0)
            gate = asyncio.Semaphore(concurrency)

            async def one(i):
                async with gate:
                    await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": f"q{i}"}])

            started = time.perf_counter()
            await asyncio.gather(*[one(i) for i in range(count)])
            return count / (time.perf_counter() - started)

        return asyncio.run(go())
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    console.print(f"[bold]hardware:[/] {manifest.hardware()}")
    import openai  # noqa: F401  (imported once here, so its import time is not charged to the first run)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = tmp / "seeds.jsonl"
        seeds.write_text("".join(json.dumps({"question": f"Seed question number {i}: explain topic {i * 7919}"})
                                 + "\n" for i in range(args.seeds)))
        ideal_rps = args.concurrency / args.delay
        clean_wall, clean = run(seeds, tmp / "clean.jsonl", args.delay, args.concurrency)
        faulty_wall, faulty = run(seeds, tmp / "faulty.jsonl", args.delay, args.concurrency, 0.10, 0.05)
        bare = bare_client_rps(args.seeds, args.delay, args.concurrency)

    table = Table("run", "seeds", "answered", "rejected", "pending", "duplicates", "requests", "wall s", "req/s",
                  "fraction of ideal", "overhead / request ms", title="bench/distill.py")
    for name, wall, data in (("fault-free", clean_wall, clean), ("10% 429 + 5% 500", faulty_wall, faulty)):
        everything = data["answered"] + data["rejected"]
        duplicates = len(everything) - len(set(everything))
        rps = data["requests"] / wall
        # each of `concurrency` slots spends wall*concurrency/requests per request; the rest beyond delay is overhead
        overhead_ms = 1000 * (wall * args.concurrency / data["requests"] - args.delay)
        table.add_row(name, str(args.seeds), str(len(data["answered"])), str(len(data["rejected"])),
                      str(data["pending"]), str(duplicates),
                      str(data["requests"]), f"{wall:.2f}", f"{rps:.1f}", f"{rps / ideal_rps:.3f}",
                      f"{overhead_ms:.1f}")
        assert len(set(everything)) + data["pending"] == args.seeds and duplicates == 0, "a seed was lost or duplicated"
    console.print(table)
    console.print(f"bare openai client, same server and concurrency: {bare:.1f} req/s ({bare / ideal_rps:.3f} of "
                  f"ideal); ftl fault-free reaches {args.seeds / clean_wall / bare:.3f} of the bare client")
    console.print(f"ideal: {args.concurrency} concurrent / {args.delay * 1000:.0f} ms = {ideal_rps:.0f} req/s; "
                  f"faulty run wall time {faulty_wall / clean_wall:.2f}× the fault-free run; "
                  f"retries {faulty['retries']}")


if __name__ == "__main__":
    main()
