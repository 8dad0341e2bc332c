#!/usr/bin/env python
"""Distil against the local OpenAI-compatible test server: throughput, and behaviour under a quota.

Throughput (``--scenario throughput``): achieved requests/s as a fraction of the ideal
(concurrency / delay), the overhead per request, and a faulty run (10% 429 with Retry-After, 5%
500) checked for every seed answered, rejected or left pending exactly once.

Quota (``--scenario quota``): a teacher enforcing ``--quota-rpm`` over 10-second windows, as Azure
OpenAI does, and ``--quota-seeds`` questions at ``--concurrency 16``. Side by side: ftl as it was
before the quota work (commit 3ebb818, run from a git worktree: its 60-second budget), ftl now with
``--rpm`` = the quota, ftl now with no budget reading OpenAI's headers, Azure's (remaining only),
or none, and (if installed) aiolimiter's leaky bucket sized to one window. For each: the 429
share, and the achieved rate and wall time against the quota's ideal.

Load-independent faults (``--scenario faults``): the teacher a proxy or a busy self-hosted server
(vLLM, TGI, LiteLLM) makes, with no rate-limit headers: 10% 429 with ``Retry-After: 1`` at random,
then that plus 5% 500, 2% malformed JSON and 2% dropped connections, ``--fault-seeds`` questions
through ``ftl distill`` at ``--concurrency``, each beside the fault-free rate of the same run. A run
still going after ``--fault-deadline`` seconds is stopped and its answers so far counted.

    python bench/distill.py                                  # every scenario
    python bench/distill.py --scenario quota --quota-seeds 300 --quota-rpm 600
"""

from __future__ import annotations

import argparse
import json
import os
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


FAULTS = {  # flags of `python -m ftl.testing`: random faults, whatever the pace
    "fault-free": [],
    "10% 429 (Retry-After 1 s)": ["--rate-429", "0.1"],
    "10% 429 + 5% 500 + 2% malformed + 2% dropped": ["--rate-429", "0.1", "--rate-500", "0.05",
                                                     "--rate-garbage", "0.02", "--rate-reset", "0.02"],
}


def fault_run(seeds: Path, out: Path, args, faults: list[str]) -> dict:
    """One `ftl distill` process (its default retries and back-off, as a user runs it) against a server
    process with these random faults and no rate-limit headers; stopped at --fault-deadline."""
    server = subprocess.Popen([sys.executable, "-m", "ftl.testing", "--delay", str(args.fault_delay), "--headers",
                               "none", "--retry-after", "1", *faults], stdout=subprocess.PIPE, text=True)
    stopped = False
    try:
        url = server.stdout.readline().strip()
        started = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-m", "ftl", "distill", "--seeds", str(seeds), "--output", str(out),
                            "--teacher", "openai", "--base-url", url, "--model", "bench", "--concurrency",
                            str(args.concurrency), "--no-track"], check=True, capture_output=True,
                           timeout=args.fault_deadline)
        except subprocess.TimeoutExpired:
            stopped = True
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()] if out.exists() else []
    record = {"answered": len(set(keys)), "duplicates": len(keys) - len(set(keys)), "stopped": stopped,
              "seconds": wall, "limited": None, "settled": {}}
    if not stopped:  # the manifest's time runs from the first request to the last answer: no start-up
        metrics = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
        m = metrics["metrics"]
        record |= {"seconds": metrics["timings"]["asking_seconds"], "limited": (m["rate_limited"], m["requests"]),
                   "pending": sum(m["pending"].values()),
                   "settled": next(iter(m["deployments"].values()))["settled"]}
    return record


def faults_scenario(tmp: Path, args) -> None:
    seeds = tmp / "fault-seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": f"Fault question number {i}: explain topic {i * 7919}"})
                             + "\n" for i in range(args.fault_seeds)))
    runs = {name: fault_run(seeds, tmp / f"faults-{i}.jsonl", args, flags)
            for i, (name, flags) in enumerate(FAULTS.items())}
    clean = runs["fault-free"]["answered"] / runs["fault-free"]["seconds"]
    table = Table("teacher", "answered", "duplicates", "429s / requests", "seconds", "seeds/s", "× fault-free",
                  "settled at", title=f"load-independent faults, no rate-limit headers: {args.fault_seeds} questions, "
                  f"concurrency {args.concurrency}, teacher {args.fault_delay * 1000:.0f} ms "
                  f"(ideal {args.concurrency / args.fault_delay:.0f}/s)")
    for name, run_ in runs.items():
        limited = f"{run_['limited'][0]} / {run_['limited'][1]}" if run_["limited"] else "-"
        settled = run_["settled"]
        pace = f"{settled['rpm']} RPM, {settled['concurrency']} in flight" if settled.get("rpm") else \
            (f"unpaced, {settled['concurrency']} in flight" if settled else "-")
        rate = run_["answered"] / run_["seconds"]
        table.add_row(name, f"{run_['answered']}{' (stopped)' if run_['stopped'] else ''}", str(run_["duplicates"]),
                      limited, f"{run_['seconds']:.1f}", f"{rate:.1f}", f"{rate / clean:.2f}", pace)
    console.print(table)


BEFORE = "3ebb818"  # the last commit before the quota work: a 60-second sliding budget, no headers, no AIMD
REPO = Path(__file__).resolve().parent.parent


def quota_run(name: str, seeds: Path, out: Path, rpm: int, window: float, delay: float, concurrency: int,
              headers: str, flags: list[str], src: Path | None = None, aiolimiter: bool = False) -> dict:
    """One `ftl distill` process against a quota-enforcing server process; figures from its manifest."""
    server = subprocess.Popen([sys.executable, "-m", "ftl.testing", "--delay", str(delay), "--rpm", str(rpm),
                               "--window", str(window), "--headers", headers], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        cli = ["distill", "--seeds", str(seeds), "--output", str(out), "--teacher", "openai", "--base-url", url,
               "--model", "bench", "--concurrency", str(concurrency), "--max-retries", "10", "--no-track", *flags]
        env = dict(os.environ, PYTHONPATH=str(src)) if src else dict(os.environ)
        code = [sys.executable, __file__, "--aiolimiter-run", str(window), *cli] if aiolimiter else \
            [sys.executable, "-m", "ftl", *cli]
        subprocess.run(code, check=True, capture_output=True, env=env, text=True)
    finally:
        server.terminate()
        server.wait()
    metrics = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    m, seconds = metrics["metrics"], metrics["timings"]["seconds"]
    pending = sum(m["pending"].values())
    requests = m.get("requests") or (m["answered_this_run"] + sum(m["rejected"].values()) + pending
                                     + sum(m["retries"].values()))
    limited = m.get("rate_limited")
    if limited is None:  # before: every 429 was retried or left pending
        limited = m["retries"].get("rate_limit", 0) + m["pending"].get("rate_limit", 0)
    settled = next(iter(m.get("deployments", {}).values()), {}).get("settled", {})
    return {"name": name, "answered": m["answered_this_run"], "pending": pending, "requests": requests,
            "rate_limited": limited, "seconds": seconds, "settled": settled}


def aiolimiter_run(window: float, cli: list[str]) -> None:
    """`ftl distill` with its budget replaced by aiolimiter's AsyncLimiter(rpm * window / 60, window)."""
    from aiolimiter import AsyncLimiter

    from ftl.cli import cli as ftl_cli
    from ftl.distill import stage
    from ftl.distill.budget import Budget

    class LeakyBucket(Budget):
        def __init__(self, rpm, tpm, window, concurrency):
            super().__init__(None, None, window, concurrency)
            self.bucket = AsyncLimiter(rpm * window / 60, window)
            self.source = "aiolimiter"

        async def acquire(self, tokens):
            await self.bucket.acquire()
            return await super().acquire(tokens)

        def done(self, ticket, **_):  # the library alone: no headers, no AIMD, no pace learnt from 429s
            self.in_flight -= 1
            self.open.pop(ticket.seq, None)
            self.released.set()

    stage.Budget = LeakyBucket
    ftl_cli.main(cli, standalone_mode=True)


def quota_scenario(tmp: Path, args) -> None:
    seeds = tmp / "quota-seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": f"Quota question number {i}: explain topic {i * 7919}"})
                             + "\n" for i in range(args.quota_seeds)))
    window, rpm, delay, concurrency = 10.0, args.quota_rpm, args.quota_delay, args.concurrency
    common = (seeds, rpm, window, delay, concurrency)
    runs = []
    before = tmp / "before"
    made = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), BEFORE],
                          capture_output=True, text=True)
    try:
        if made.returncode == 0:
            runs.append(quota_run(f"before ({BEFORE}) --rpm {rpm}", seeds, tmp / "b1.jsonl", *common[1:], "openai",
                                  ["--rpm", str(rpm)], src=before / "src"))
        else:
            console.print(f"[yellow]no worktree of {BEFORE} ({made.stderr.strip()}): the 'before' row is left out")
    finally:
        if made.returncode == 0:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)
    runs.append(quota_run(f"now --rpm {rpm}", seeds, tmp / "n1.jsonl", *common[1:], "openai", ["--rpm", str(rpm)]))
    for headers in ("openai", "azure", "none"):
        runs.append(quota_run(f"now, no budget, {headers} headers", seeds, tmp / f"n-{headers}.jsonl", *common[1:],
                              headers, []))
    try:
        import aiolimiter  # noqa: F401
        runs.append(quota_run(f"aiolimiter bucket of {rpm * window / 60:.0f} per {window:.0f} s", seeds,
                              tmp / "aio.jsonl", *common[1:], "none", ["--rpm", str(rpm)], aiolimiter=True))
    except ImportError:
        console.print("aiolimiter is not installed: `pip install aiolimiter` adds its row")
    ideal = args.quota_seeds * 60 / rpm
    table = Table("run", "answered", "pending", "requests", "429s", "429 share", "seconds", "× ideal time",
                  "achieved / quota rate", "settled at", title=f"quota: {rpm} RPM over {window:.0f} s windows, "
                  f"{args.quota_seeds} questions, concurrency {concurrency}, teacher {delay * 1000:.0f} ms; ideal "
                  f"{ideal:.1f} s")
    for run_ in runs:
        settled = run_["settled"]
        rate = f"{settled['rpm']} RPM ({settled['source']})" if settled.get("rpm") else "-"
        table.add_row(run_["name"], str(run_["answered"]), str(run_["pending"]), str(run_["requests"]),
                      str(run_["rate_limited"]), f"{run_['rate_limited'] / run_['requests']:.1%}",
                      f"{run_['seconds']:.1f}", f"{run_['seconds'] / ideal:.2f}",
                      f"{run_['answered'] * 60 / run_['seconds'] / rpm:.2f}", rate)
    console.print(table)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--aiolimiter-run":
        return aiolimiter_run(float(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["throughput", "quota", "faults", "all"], default="all")
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quota-seeds", type=int, default=300)
    parser.add_argument("--quota-rpm", type=int, default=600)
    parser.add_argument("--quota-delay", type=float, default=0.2, help="the quota scenario's teacher seconds per answer")
    parser.add_argument("--fault-seeds", type=int, default=600)
    parser.add_argument("--fault-delay", type=float, default=0.2, help="the faults teacher's seconds per answer")
    parser.add_argument("--fault-deadline", type=float, default=180.0, help="stop a faults run after these seconds")
    args = parser.parse_args()
    console.print(f"[bold]hardware:[/] {manifest.hardware()}")
    if args.scenario in ("quota", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            quota_scenario(Path(tmp), args)
    if args.scenario in ("faults", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            faults_scenario(Path(tmp), args)
    if args.scenario in ("quota", "faults"):
        return
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
