"""One teacher deployment's rate budget, shaped the way providers enforce quotas.

Azure OpenAI enforces a deployment's RPM and TPM over short windows (RPM/6 requests and TPM/6
tokens per 10 seconds), not per minute. A budget that lets a minute's worth through at once gets
429s; one spread evenly does not. So a budget here is:

- **paced**: one request every ``60 / rpm`` seconds, and each request's tokens spaced at the TPM
  rate (generic cell rate algorithm, no burst), with 2% headroom for network jitter;
- **capped per window**: the tokens sent in any ``window`` seconds never exceed ``tpm * window / 60``
  (pacing alone can overshoot by the last request's tokens);
- **corrected**: a request's tokens are estimated before sending (prompt + ``max_tokens * n``) and
  replaced by the prompt tokens the usage reports, as providers charge ``max_tokens`` up front;
- **adaptive**: without ``--rpm``/``--tpm``, the rate comes from the rate-limit headers: OpenAI's
  ``x-ratelimit-limit-*`` give it; Azure sends only ``x-ratelimit-remaining-*``, from which the first
  window's responses give the window's allowance. A remaining count that the requests in flight will
  use up holds new ones until the reset. A lowered pace grows back by about a tenth per window up
  to what the endpoint has sustained, and a fiftieth above it, where each probe of a quota costs a 429.

Which 429s slow the deployment. A 429 delays the retry of its own request by its ``Retry-After``
(the caller does that). A 429 for a request sent at the pace in force (not before it was last
lowered) lowers the pace, from the second window on: with no headers, to what the endpoint accepted
in the window before, and never below what it has sustained, the most requests it accepted in one
window. The first 429 after a window without one, or ``BURST`` in a row, also hold every request until
their ``Retry-After`` and halve the requests in flight, which grow back by one per round (AIMD).
Why: a quota's 429s follow the pace. Below a windowed quota none come; once the pace crosses it, they
start after a quiet window, or come in runs when a window's allowance is used up, and they stop at the
lower pace. A proxy's or a busy self-hosted server's 429s (vLLM, TGI, LiteLLM send them with no
headers when their queue is full) can come at random, whatever the pace. The rule before held the
whole deployment for every 429's Retry-After, halved the requests in flight and paced at what the
window before accepted, which random 429s keep below what was sent; both ratcheted down on every 429,
and 10% random 429s with ``Retry-After: 1`` ran at 0.03× the fault-free rate
(``bench/distill.py --scenario faults``). Random 429s at any useful rate come every few responses,
so they do not find a quiet window, ``BURST`` in a row by chance is 1 in 10⁵ responses at 10%, and the floor stops the
ratchet: they pin the pace at most their share below the best window. A windowed quota accepts no
more than its allowance in any window, so the floor never holds the pace above it.

Why not a library: aiolimiter is a leaky bucket whose capacity is its burst, so a window's
allowance as capacity sends up to twice the window's quota in the first window (``bench/distill.py``
measures it), and pyrate-limiter's buckets are sliding-window logs that release a whole window at
once. Neither can correct a request's weight after the fact, which TPM needs (usage), nor change
its rate while running, which headers and AIMD need. This is the ~100 lines they would wrap.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from dataclasses import dataclass

_FROM_REMAINING = "x-ratelimit-remaining-* in the first window"
_FROM_429 = "429s (the requests accepted in the window before)"
BURST = 5  # 429s in a row, for requests sent at the pace in force, that say the endpoint refuses all for now
HEADROOM = 1.02  # pace 2% under the quota: a request that leaves a few ms late must not share a window
CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English; off by ±25% on other text, until usage corrects it


@dataclass
class RateLimits:
    """What a response's rate-limit headers said. Durations are seconds."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None

    @classmethod
    def from_headers(cls, headers) -> RateLimits | None:
        if headers is None:
            return None

        def number(name):
            try:
                value = headers.get(name)
                return int(float(value)) if value is not None and float(value) >= 0 else None
            except (TypeError, ValueError):
                return None

        limits = cls(number("x-ratelimit-limit-requests"), number("x-ratelimit-limit-tokens"),
                     number("x-ratelimit-remaining-requests"), number("x-ratelimit-remaining-tokens"),
                     parse_duration(headers.get("x-ratelimit-reset-requests")),
                     parse_duration(headers.get("x-ratelimit-reset-tokens")))
        return limits if any(v is not None for v in vars(limits).values()) else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text) -> float | None:
    """OpenAI's reset headers: Go durations ('1s', '6m0s', '20ms', '1.5s'); a bare number is seconds."""
    if text is None:
        return None
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(value) * scale[unit] for value, unit in parts)


class TokenCounter:
    """Prompt tokens estimated from characters, at a ratio learned from the usage responses report."""

    def __init__(self):
        self.chars = 0
        self.tokens = 0

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens >= 50 else CHARS_PER_TOKEN

    def estimate(self, messages: list[dict]) -> int:
        return math.ceil(sum(len(m["content"]) for m in messages) / self.chars_per_token) + 4 * len(messages)

    def learn(self, messages: list[dict], prompt_tokens: int) -> None:
        if prompt_tokens > 0:
            self.chars += sum(len(m["content"]) for m in messages)
            self.tokens += prompt_tokens


@dataclass
class Ticket:
    """One request let through: when, its place in the sending order, and its charged tokens."""

    seq: int
    sent: float
    tokens: int
    tokens_before: int  # tokens sent before this one
    entry: list  # [time, tokens] in the window log, so the charge can be corrected


class Budget:
    """Requests and tokens for one deployment: see the module docstring."""

    def __init__(self, rpm: float | None, tpm: float | None, window: float, concurrency: int):
        self.given_rpm, self.given_tpm = rpm, tpm
        self.rpm, self.tpm = rpm, tpm  # the pace now; None = not paced
        self.caps = {"rpm": rpm, "tpm": tpm}  # the most the pace grows back to: the budget, or a header's limit
        self.source = "--rpm/--tpm" if (rpm or tpm) else None
        self.window = window
        self.max_flight = concurrency
        self.flight_limit = float(concurrency)
        self.in_flight = 0
        self.tat_requests = self.tat_tokens = 0.0  # when the next request / token may go (monotonic)
        self.hold_until = 0.0
        self.log: deque[list] = deque()  # [sent, tokens] of the last window
        self.sent = 0
        self.tokens_sent = 0
        self.first_sent: float | None = None
        self.last_decrease = -math.inf  # when the deployment last slowed down
        self.refused_in_row = 0  # 429s in a row, for requests sent since then
        self.refused_until = 0.0  # the latest Retry-After of those
        self.last_refused = -math.inf  # when the last 429 came
        self.holds = 0  # times 429s held the deployment
        self.rate_limited = 0
        self.sustained = 0.0  # RPM: the most requests the endpoint accepted in one window; the pace's floor
        self.accepted: deque[float] = deque()  # when the requests that were not refused were sent
        self.lowest_flight = concurrency
        self.open: dict[int, float] = {}  # requests in flight: seq → sent
        self.lock = asyncio.Lock()
        self.released = asyncio.Event()

    async def acquire(self, tokens: int) -> Ticket:
        """Wait until the pace, the window, any hold and the requests in flight allow one more."""
        async with self.lock:  # FIFO: requests go in the order they asked
            while True:
                now = time.monotonic()
                wait = max(self.hold_until - now, 0.0)
                if self.rpm:
                    wait = max(wait, self.tat_requests - now)
                if self.tpm:
                    wait = max(wait, self.tat_tokens - now, self._window_wait(now, tokens))
                if wait <= 0 and self.in_flight < max(1, int(self.flight_limit)):
                    break
                self.released.clear()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:  # only the requests in flight stand in the way: wait for one to finish
                    await self.released.wait()
            if self.rpm:
                self.tat_requests = max(now, self.tat_requests) + 60 / self.rpm * HEADROOM
            if self.tpm:
                self.tat_tokens = max(now, self.tat_tokens) + tokens * 60 / self.tpm * HEADROOM
            entry = [now, tokens]
            self.log.append(entry)
            ticket = Ticket(self.sent, now, tokens, self.tokens_sent, entry)
            self.sent += 1
            self.tokens_sent += tokens
            self.in_flight += 1
            self.open[ticket.seq] = now
            if self.first_sent is None:
                self.first_sent = now
            return ticket

    def _window_wait(self, now: float, tokens: int) -> float:
        """Seconds until this request's tokens fit in the window (a request larger than a whole window
        waits for an empty one: the caller refuses those up front when the budget is given)."""
        while self.log and now - self.log[0][0] >= self.window:
            self.log.popleft()
        allowance = self.tpm * self.window / 60 / HEADROOM
        used = sum(t for _, t in self.log)
        if used + tokens <= allowance or not self.log:
            return 0.0
        for sent, spent in self.log:  # oldest first: when enough has left the window
            used -= spent
            if used + tokens <= allowance:
                return sent + self.window - now
        return self.log[-1][0] + self.window - now

    def restamp(self, ticket: Ticket, tokens: int) -> None:
        """The request goes now, with these tokens: a slot granted before its seed was taken (or before a
        retry's back-off) must not let the next one follow too closely, nor leave the window too early."""
        now = time.monotonic()
        if self.rpm:
            self.tat_requests = max(self.tat_requests, now + 60 / self.rpm * HEADROOM)
        if self.tpm:
            self.tat_tokens = max(self.tat_tokens + (tokens - ticket.tokens) * 60 / self.tpm * HEADROOM,
                                  now + tokens * 60 / self.tpm * HEADROOM)
        self.tokens_sent += tokens - ticket.tokens
        ticket.sent = ticket.entry[0] = now
        ticket.tokens = ticket.entry[1] = tokens
        self.open[ticket.seq] = now

    def cancel(self, ticket: Ticket) -> None:
        """A slot not used after all (no seed left, or the run stopping)."""
        self.in_flight -= 1
        self.open.pop(ticket.seq, None)
        ticket.entry[1] = 0
        self.released.set()

    def done(self, ticket: Ticket, *, limits: RateLimits | None = None, rate_limited: bool = False,
             retry_after: float | None = None, charged: int | None = None) -> None:
        """A response came back: free its slot, correct its tokens, and learn from headers or a 429."""
        now = time.monotonic()
        self.in_flight -= 1
        self.open.pop(ticket.seq, None)
        self.released.set()
        if charged is not None and charged != ticket.tokens:
            if self.tpm:
                self.tat_tokens += (charged - ticket.tokens) * 60 / self.tpm * HEADROOM
            self.tokens_sent += charged - ticket.tokens
            ticket.entry[1] = charged
        if limits is not None:
            self._learn(ticket, limits, now)
        while self.accepted and self.accepted[0] < now - 2 * self.window:
            self.accepted.popleft()
        if rate_limited:
            self.rate_limited += 1
            self._refused(ticket, now, retry_after)
        else:
            self.refused_in_row, self.refused_until = 0, 0.0
            self.accepted.append(ticket.sent)
            # The window that ends at this request's send: requests sent later but answered sooner belong
            # to a later window (counting them let slow answers lift the floor above a quota). Less the one
            # at the window's edge: sent a few ms before it arrived, it may have arrived outside.
            took = sum(1 for sent in self.accepted if ticket.sent - self.window < sent <= ticket.sent) - 1
            self.sustained = max(self.sustained, took * 60 / self.window)
            self.flight_limit = min(self.max_flight, self.flight_limit + 1 / self.flight_limit)
            # Additive increase, per window's worth of answers, up to the known limit (see the docstring).
            answers = max(1.0, sum(1 for sent in self.accepted if sent > now - self.window))
            for which in ("rpm", "tpm"):
                rate = getattr(self, which)
                if rate:
                    grow = 1 + (0.02 if which == "rpm" and rate >= self.sustained else 0.1) / answers
                    setattr(self, which, min(self.caps.get(which) or math.inf, rate * grow))

    def _refused(self, ticket: Ticket, now: float, retry_after: float | None) -> None:
        """A 429 for a request sent at the pace in force lowers the pace (from the second window on:
        before, too little was accepted to pace by). The first after a window without one, or ``BURST``
        in a row, also hold the deployment until their Retry-After and halve the requests in flight.
        See the module docstring for why."""
        quiet = now - self.last_refused >= self.window
        self.last_refused = now
        if ticket.sent <= self.last_decrease:  # sent before the pace was lowered: says nothing of the pace now
            return
        self.refused_in_row += 1
        self.refused_until = max(self.refused_until, now + (retry_after if retry_after is not None else 1.0))
        hold = quiet or self.refused_in_row >= BURST
        if hold:
            self.holds += 1
            self.hold_until = max(self.hold_until, self.refused_until)
            self.refused_in_row, self.refused_until = 0, 0.0
            self.flight_limit = max(1.0, self.flight_limit / 2)
            self.lowest_flight = min(self.lowest_flight, int(self.flight_limit))
        if ticket.sent - (self.first_sent or ticket.sent) >= self.window:
            self._slow_down(ticket)
        elif not hold:
            return
        self.last_decrease = now

    def _slow_down(self, ticket: Ticket) -> None:
        """Without headers, what the endpoint accepted in the window before the refused request is its
        allowance (at least; the pace grows back from there); otherwise the pace drops by a tenth.
        Never below what the endpoint has sustained, so 429s that come whatever the pace cannot ratchet it."""
        start = ticket.sent - self.window
        # (requests still in flight are not counted: after a hold they are mostly refused too)
        took = sum(1 for sent in self.accepted if start < sent < ticket.sent)
        if self.source in (None, _FROM_429) and took:
            self.rpm = max(took * 60 / self.window, self.sustained)
            self.source = _FROM_429
            return
        self.rpm = max(self.rpm * 0.9, self.sustained) if self.rpm else self.rpm
        self.tpm = self.tpm * 0.9 if self.tpm else self.tpm

    def _learn(self, ticket: Ticket, limits: RateLimits, now: float) -> None:
        # The rate: OpenAI says it (per minute); Azure's remaining counts in the first window give it.
        if not self.given_rpm and limits.limit_requests:
            self._adopt("rpm", limits.limit_requests, "x-ratelimit-limit-requests")
        if not self.given_tpm and limits.limit_tokens:
            self._adopt("tpm", limits.limit_tokens, "x-ratelimit-limit-tokens")
        first_window = ticket.sent - (self.first_sent or ticket.sent) < self.window
        if first_window and not limits.limit_requests and not self.given_rpm and limits.remaining_requests is not None:
            # nothing has left the window yet: it holds every request sent so far (at most), so
            # remaining + those is the window's allowance (at most); the smallest such sum is the tightest
            self._adopt("rpm", (limits.remaining_requests + ticket.seq + 1) * 60 / self.window, _FROM_REMAINING)
        if first_window and not limits.limit_tokens and not self.given_tpm and limits.remaining_tokens is not None:
            self._adopt("tpm", (limits.remaining_tokens + ticket.tokens_before + ticket.tokens) * 60 / self.window,
                        _FROM_REMAINING)
        # Credit: what the headers say is left, less what was sent since this request. Used up = hold.
        if limits.remaining_requests is not None and limits.remaining_requests - (self.sent - ticket.seq - 1) <= 0:
            self.hold_until = max(self.hold_until, now + (limits.reset_requests or self.window / 10))
        if limits.remaining_tokens is not None and \
                limits.remaining_tokens - (self.tokens_sent - ticket.tokens_before - ticket.tokens) < ticket.tokens:
            self.hold_until = max(self.hold_until, now + (limits.reset_tokens or self.window / 10))

    def _adopt(self, which: str, per_minute: float, source: str) -> None:
        """A limit learnt from headers: the pace's cap, and the pace itself when it is above it."""
        if self.caps.get(which) is None or per_minute < self.caps[which]:
            self.caps[which] = float(per_minute)
            rate = getattr(self, which)
            setattr(self, which, float(per_minute) if rate is None else min(rate, per_minute))
            self.source = source

    def settled(self) -> dict:
        """The pace it ended at: pass these as --rpm/--tpm next time to start there."""
        return {"rpm": round(self.rpm) if self.rpm else None, "tpm": round(self.tpm) if self.tpm else None,
                "source": self.source, "concurrency": int(self.flight_limit), "lowest_concurrency": self.lowest_flight,
                "holds": self.holds, "sustained_rpm": round(self.sustained)}
