"""ftl distill under real quotas: budgets spread over the provider's window, rate-limit headers,
AIMD, and fan-out across deployments, all against the real local HTTP test server enforcing a
windowed quota (``ftl.testing.TeacherServer(rpm=…, tpm=…, window=…)``)."""

import json
import os
import subprocess
import sys

import pytest

from ftl.distill import DistillConfig, distill
from ftl.distill.budget import RateLimits, parse_duration
from ftl.testing import TeacherServer
from conftest import kill_9_after, write_jsonl

WINDOW = 1.0  # the tests' quota window: seconds, where Azure's is 10, so a test sees several windows quickly
RPM = 1200  # 20 requests per 1 s window


def seeds(tmp_path, count=100, name="seeds.jsonl"):
    return write_jsonl(tmp_path / name, [{"question": f"Seed question number {i}: explain topic {i * 7919}"}
                                         for i in range(count)])


def run(tmp_path, urls, **kw):
    base = dict(seeds=str(seeds(tmp_path, kw.pop("count", 100))), output=tmp_path / "out.jsonl", teacher="openai",
                model="m", concurrency=8, quota_window=WINDOW, backoff=0.05, max_retries=8, max_tokens=100)
    if isinstance(urls, str):
        base["base_url"] = urls
    else:
        base["deployments"] = urls
    return distill(DistillConfig(**{**base, **kw}))


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_window(server):
    """(responses, 429s) per quota window, from the first response (not the server's start)."""
    first = min(t for t, _ in server.events)
    events = [(t - first, status) for t, status in server.events]
    return [(sum(1 for t, _ in events if w <= t < w + WINDOW),
             sum(1 for t, status in events if status == 429 and w <= t < w + WINDOW))
            for w in range(int(max(t for t, _ in events) / WINDOW) + 1)]


def rate_limited_after_the_first_window(server) -> float:
    windows = by_window(server)[1:]
    return sum(limited for _, limited in windows) / max(1, sum(count for count, _ in windows))


@pytest.mark.parametrize("quota", [{"rpm": RPM}, {"tpm": 72_000}], ids=["rpm", "tpm"])
def test_a_budget_equal_to_the_quota_gets_under_1_percent_429(tmp_path, quota):
    """RPM: 20 a window; TPM: 1200 tokens a window, each request ~15 prompt tokens + 100 max_tokens. The
    client estimates prompt tokens from characters and corrects from usage (the server counts words)."""
    with TeacherServer(delay=0.02, window=WINDOW, **quota) as server:
        result = run(tmp_path, server.url, **quota)
        assert server.requests == result.requests
        share = server.statuses[429] / server.requests
    assert result.answered == 100 and share < 0.01, (share, by_window(server))
    # the same quota and no budget, with no headers to read, does get 429s: the budget is what avoids them
    (tmp_path / "bare").mkdir()
    with TeacherServer(delay=0.02, window=WINDOW, headers=None, **quota) as server:
        bare = run(tmp_path / "bare", server.url)
    assert bare.answered == 100 and bare.rate_limited_share > 0.01
    summary = json.loads((tmp_path / "out.manifest.json").read_text())["metrics"]
    assert summary["requests"] == result.requests and summary["rate_limited"] == result.rate_limited
    assert summary["effective_rpm"] > 0 and summary["effective_tpm"] > 0
    (deployment,) = summary["deployments"].values()
    assert deployment["settled"]["source"] == "--rpm/--tpm" and deployment["wait_budget_s"] > 0


@pytest.mark.parametrize("style", ["openai", "azure"])
def test_without_a_budget_the_headers_bring_429s_down_after_the_first_window(tmp_path, style):
    """OpenAI sends the limit; Azure only the remaining counts, from which the first window gives the rate."""
    with TeacherServer(delay=0.02, window=WINDOW, rpm=RPM, headers=style) as server:
        result = run(tmp_path, server.url, count=120)
    assert result.answered == 120 and rate_limited_after_the_first_window(server) < 0.01, by_window(server)
    (deployment,) = result.deployments.values()
    assert deployment["settled"]["rpm"] == pytest.approx(RPM, rel=0.1)
    assert deployment["settled"]["source"].startswith("x-ratelimit-")


def test_without_headers_a_quota_s_429s_still_lower_the_pace_and_every_seed_is_kept(tmp_path):
    """A quota's 429s come in runs at a pace above it: they hold the deployment, halve the requests in
    flight and pace it at what a window accepted; then few 429s, once the first window is past."""
    with TeacherServer(delay=0.02, window=WINDOW, rpm=RPM, headers=None) as server:
        result = run(tmp_path, server.url, count=150)
        assert server.statuses[429] == result.rate_limited > 0
    answered = rows(tmp_path / "out.jsonl")
    assert result.answered == 150 and not result.pending and len({r["key"] for r in answered}) == 150
    assert result.retries["rate_limit"] == result.rate_limited  # each 429 was asked again, once
    # about one a window once past the first: the pace probing back up over a quota of 20 a window
    assert rate_limited_after_the_first_window(server) < 0.1, by_window(server)
    (deployment,) = result.deployments.values()
    settled = deployment["settled"]
    assert settled["holds"] >= 1 and settled["lowest_concurrency"] < 8  # held, and halved, on a run of 429s
    assert 0.6 * RPM < settled["rpm"] < 1.3 * RPM  # what a window took, probed up after
    assert settled["source"].startswith("429s") and settled["sustained_rpm"] <= RPM


def test_random_429s_wait_for_themselves_and_never_ratchet_the_pace_down(tmp_path):
    """A proxy or a busy self-hosted server (vLLM, TGI, LiteLLM) answers 429 with no rate-limit headers
    at random, whatever the pace. Each such 429 delays only its own retry: the deployment is not held,
    the requests in flight are not halved, and the pace never goes below what the endpoint sustained.
    (Before, every 429 halved the requests in flight and paced at what the window before accepted,
    which the 429s kept lowering: both ratcheted down.) Other random faults come on top."""
    with TeacherServer(delay=0.05, window=WINDOW, rate_429=0.1, rate_500=0.05, rate_garbage=0.02, rate_reset=0.02,
                       retry_after=0.2, headers=None) as server:
        result = run(tmp_path, server.url, count=300, max_retries=10)
        assert server.statuses[429] == result.rate_limited >= 15
    answered = rows(tmp_path / "out.jsonl")
    assert result.answered == 300 and not result.pending and len({r["key"] for r in answered}) == 300
    assert result.retries["rate_limit"] == result.rate_limited
    (deployment,) = result.deployments.values()
    settled = deployment["settled"]
    # BURST 429s in a row come by chance once in 10^5 responses at 10%: allow one such slowdown
    assert settled["holds"] <= 1 and settled["lowest_concurrency"] >= 4, settled
    assert settled["sustained_rpm"] > 0 and (settled["rpm"] is None or settled["rpm"] >= settled["sustained_rpm"])


def test_two_deployments_one_failing_everything_answered_once_by_the_healthy_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_TEST_KEY_A", "sk-secret-a")
    monkeypatch.setenv("FTL_TEST_KEY_B", "sk-secret-b")
    with TeacherServer(rate_500=1.0, api_key="sk-secret-a") as bad, TeacherServer(api_key="sk-secret-b") as good:
        deployments = tmp_path / "deployments.yaml"
        deployments.write_text(f"""deployments:
  - name: east
    base_url: {bad.url}
    model: m
    api_key_env: FTL_TEST_KEY_A
    rpm: 6000
  - name: west
    base_url: {good.url}
    model: m
    api_key_env: FTL_TEST_KEY_B
    rpm: 6000
    price_input: 1.0
    price_output: 2.0
""")
        result = run(tmp_path, deployments, count=40)
        assert bad.statuses[200] == 0 and bad.requests >= 3
    answered = rows(tmp_path / "out.jsonl")
    assert result.answered == 40 and not result.pending and not result.rejected
    assert len({r["key"] for r in answered}) == len(answered) == 40
    assert {r["deployment"] for r in answered} == {"west"}
    assert result.deployments["east"]["set_aside"] and any("east set aside" in w for w in result.warnings)
    assert result.deployments["west"]["answered"] == 40 and result.deployments["east"]["answered"] == 0
    manifest = (tmp_path / "out.manifest.json").read_text()
    west = json.loads(manifest)["metrics"]["deployments"]["west"]
    assert west["requests"] == 40 and west["prompt_tokens"] > 0 and west["estimated_cost"] > 0
    assert "sk-secret" not in manifest


def test_kill_9_mid_fan_out_then_rerun_gives_each_seed_exactly_once(tmp_path):
    path = seeds(tmp_path, 60)
    with TeacherServer(delay=0.05) as one, TeacherServer(delay=0.05) as two:
        cmd = [sys.executable, "-m", "ftl", "distill", "--seeds", str(path), "--output", "out.jsonl",
               "--teacher", "openai", "--base-url", one.url, "--base-url", two.url, "--model", "m",
               "--concurrency", "2"]
        out = tmp_path / "out.jsonl"
        assert 10 <= kill_9_after(cmd, out, 10, cwd=tmp_path) < 60
        subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=120)
        assert one.statuses[200] > 0 and two.statuses[200] > 0  # both deployments answered
    answered = rows(out)
    assert sorted(r["Question"] for r in answered) == sorted(json.loads(line)["question"]
                                                             for line in path.read_text().splitlines())
    assert len({r["key"] for r in answered}) == 60
    assert len({r["deployment"] for r in answered}) == 2


def ftl(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "ftl", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def one_error(out) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode != 0 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_bad_quota_input_is_one_line(tmp_path):
    path = seeds(tmp_path, 3)
    base = ["distill", "--seeds", path, "--output", "o.jsonl", "--teacher", "openai", "--model", "m",
            "--base-url", "http://127.0.0.1:9/v1"]
    assert "--rpm" in one_error(ftl(*base, "--rpm", "0", cwd=tmp_path))
    assert "--quota-window" in one_error(ftl(*base, "--quota-window", "-1", cwd=tmp_path))
    assert "not printed" in one_error(ftl(*base, "--api-key-env", "sk-0123456789abcdef", cwd=tmp_path))
    assert "sk-0123456789abcdef" not in ftl(*base, "--api-key-env", "sk-0123456789abcdef", cwd=tmp_path).stderr
    deployments = tmp_path / "d.yaml"
    deployments.write_text("- base_url: http://127.0.0.1:9/v1\n  model: m\n  api_key_env: FTL_NOT_SET_KEY\n")
    assert "drop --base-url" in one_error(ftl(*base, "--deployments", deployments, cwd=tmp_path))
    base = base[:-4]  # the teachers come from the file
    error = one_error(ftl(*base, "--deployments", deployments, cwd=tmp_path, env={"FTL_NOT_SET_KEY": ""}))
    assert "$FTL_NOT_SET_KEY is not set" in error
    deployments.write_text("- base_url: http://127.0.0.1:9/v1\n  model: m\n  rpm: -5\n")
    assert "rpm" in one_error(ftl(*base, "--deployments", deployments, cwd=tmp_path))
    deployments.write_text("- base_url: [unclosed\n")
    assert f"{deployments}:" in one_error(ftl(*base, "--deployments", deployments, cwd=tmp_path))
    three_models = ftl("distill", "--seeds", path, "--output", "o.jsonl", "--teacher", "openai", "--model", "a",
                       "--model", "b", "--model", "c", "--base-url", "http://x/v1", "--base-url", "http://y/v1",
                       cwd=tmp_path)
    assert three_models.returncode != 0 and "one --model per" in three_models.stderr
    assert "--api-key-env" in one_error(ftl(*base, "--api-key-env", "FTL_NOT_SET_KEY", cwd=tmp_path,
                                            env={"FTL_NOT_SET_KEY": ""}))


def test_max_tokens_above_one_window_of_tpm_is_warned_about(tmp_path):
    with TeacherServer() as server:
        out = ftl("distill", "--seeds", seeds(tmp_path, 1), "--output", "o.jsonl", "--teacher", "openai",
                  "--model", "m", "--base-url", server.url, "--tpm", "600", "--max-tokens", "512", cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 0 and "--max-tokens 512" in text and "(100 tokens)" in text and "--quota-window 60" in text


def test_the_same_endpoint_and_model_twice_is_warned_about(tmp_path):
    with TeacherServer() as server:
        out = ftl("distill", "--seeds", seeds(tmp_path, 4), "--output", "o.jsonl", "--teacher", "openai",
                  "--model", "m", "--base-url", server.url, "--base-url", server.url + "/", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert " ".join((out.stdout + out.stderr).split()).count("share one quota") == 1
    assert len(rows(tmp_path / "o.jsonl")) == 4


def test_rate_limit_headers_are_parsed_as_openai_and_azure_send_them():
    assert parse_duration("6m0s") == 360 and parse_duration("20ms") == 0.02 and parse_duration("1.5s") == 1.5
    assert parse_duration("17") == 17 and parse_duration("soon") is None
    azure = RateLimits.from_headers({"x-ratelimit-remaining-requests": "79", "x-ratelimit-remaining-tokens": "61353"})
    assert azure == RateLimits(remaining_requests=79, remaining_tokens=61353)
    assert RateLimits.from_headers({"x-ratelimit-limit-tokens": "-1"}) is None  # "no limit" is not a limit


def test_the_pace_floor_counts_one_window_even_when_answers_come_back_out_of_order():
    """The floor is the most requests accepted in one window. Slow answers arrive after later ones: counting
    those later sends lifted the floor above the quota (a teacher answering in 1-15 s at a 10 s window)."""
    import time

    from ftl.distill.budget import Budget, Ticket

    budget = Budget(None, None, window=10.0, concurrency=16)
    now = time.monotonic()
    tickets = [Ticket(i, now - 20 + i, 1, i, [now - 20 + i, 1]) for i in range(20)]  # one a second: 60 RPM
    budget.in_flight = len(tickets)
    slow = tickets.pop(5)
    for ticket in tickets + [slow]:  # every answer in order, then the slow one
        budget.done(ticket)
    assert 0 < budget.sustained <= 60, budget.sustained
