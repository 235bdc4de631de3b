"""The soak's traffic: a weighted mix of request kinds, each checked and recorded.

Every kind but `bad` sets ignore_eos, so a complete answer has exactly max_tokens tokens per
choice: anything shorter is an incomplete output, not a model that chose to stop. The checks
are plain functions of (status, body) so they are tested without a server.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from loadtest.data import DATASET_DIR, load_jsonl
from loadtest.sse import DONE, SSEDecoder, sse_lines

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# Relative frequency of each kind. Streams and plain requests dominate, as in real traffic;
# cancellations and bad requests are rarer but still hundreds of times in 10 minutes.
WEIGHTS: dict[str, int] = {
    "completion": 3,
    "chat": 3,
    "chat_stream": 3,
    "completion_stream": 2,
    "n2": 2,  # non-streaming, two choices per request
    "cancel": 2,  # a stream closed by the client after a few events
    "bad": 1,  # an invalid request: must be refused with an OpenAI error object
}
KINDS = tuple(WEIGHTS)
# Kinds whose latency is a whole generation: the ones the latency windows are made of.
GENERATION_KINDS = ("completion", "chat", "chat_stream", "completion_stream", "n2")

# Outcomes. EXPECTED is the success of a bad request; the last three are failures.
OK = "ok"
EXPECTED = "expected_4xx"
UNEXPECTED_STATUS = "unexpected_status"  # 5xx, or a 4xx the request did not deserve
TRANSPORT = "transport"  # connection error or the client's timeout
INCOMPLETE = "incomplete"  # a 200 with fewer tokens than asked, or a stream without [DONE]
UNEXPECTED = (UNEXPECTED_STATUS, TRANSPORT, INCOMPLETE)
OUTCOMES = (OK, EXPECTED, *UNEXPECTED)

MIN_TOKENS, MAX_TOKENS = 8, 48
# Prompts are cut to this many characters: the tiny test tokenizer spends about one token per
# character, and prompt + chat template + 48 new tokens must fit a 512-token context.
PROMPT_CHARS = 320


@dataclass
class Record:
    t: float  # start, seconds since the load began
    kind: str
    latency_s: float
    status: int | None  # HTTP status; None when no response came
    outcome: str  # one of OUTCOMES
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class KindPicker:
    """Kinds at random by WEIGHTS, except that the first len(KINDS) picks are every kind once
    (shuffled): even a short run exercises every kind."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"kinds-{seed}")
        self._first = list(KINDS)
        self._rng.shuffle(self._first)

    def next(self) -> str:
        if self._first:
            return self._first.pop()
        return self._rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]


class PromptSource:
    """The shipped repetitive and chat prompts, each made unique by a counter tag."""

    def __init__(self) -> None:
        self.repetitive = [r["prompt"] for r in load_jsonl(DATASET_DIR / "repetitive.jsonl")]
        self.chat = [r["prompt"] for r in load_jsonl(DATASET_DIR / "chat.jsonl")]
        self._count = itertools.count()

    def next(self, rng: random.Random) -> str:
        # Mostly repetitive: its answers copy the prompt, so the n-gram drafter gets hits.
        rows = self.repetitive if rng.random() < 0.6 else self.chat
        text = rng.choice(rows)[:PROMPT_CHARS]
        tag = f"[soak {next(self._count)}]"
        # The tag first makes every prompt's blocks its own; last, the prompt shares its
        # cached prefix blocks with earlier ones, so shared blocks get freed (and cancelled).
        return f"{tag} {text}" if rng.random() < 0.7 else f"{text} {tag}"


def generation_body(
    model: str,
    prompt: str,
    chat: bool,
    max_tokens: int,
    rng: random.Random,
    n: int = 1,
    stream: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if n > 1:
        body["n"] = n
    # Mostly greedy; sometimes sampled, which takes speculation's rejection-sampling path.
    if n > 1 or rng.random() < 0.3:
        body.update(temperature=0.8, seed=rng.randrange(2**31))
    else:
        body["temperature"] = 0.0
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def bad_requests(model: str, prompt: str) -> list[tuple[str, str, bytes, int]]:
    """(name, path, body, the status it must get) for each kind of bad request sent."""
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    comp = {"model": model, "prompt": prompt, "max_tokens": 8}

    def enc(body: dict[str, Any]) -> bytes:
        return json.dumps(body).encode()

    return [
        ("temperature -1", CHAT, enc({**chat, "temperature": -1}), 400),
        ("unknown model", CHAT, enc({**chat, "model": "no-such-model"}), 404),
        ("n = 0", COMPLETIONS, enc({**comp, "n": 0}), 400),
        ("body not JSON", COMPLETIONS, b"{not json", 400),
        # Past a 512-token context with any tokenizer: refused after tokenising.
        ("prompt too long", COMPLETIONS, enc({**comp, "prompt": "hello world " * 600}), 400),
    ]


# --- checks: (status, body) -> (outcome, detail) ------------------------------------------


def check_completion(status: int, body: Any, max_tokens: int, n: int = 1) -> tuple[str, str]:
    """A non-streaming answer: 200, n choices, n x max_tokens completion tokens."""
    if status != 200:
        return UNEXPECTED_STATUS, f"HTTP {status}: {str(body)[:200]}"
    if not isinstance(body, dict):
        return INCOMPLETE, f"body is not a JSON object: {str(body)[:200]}"
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        return INCOMPLETE, f"{len(choices) if isinstance(choices, list) else 'no'} choices, n={n}"
    usage = body.get("usage")
    got = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if got != max_tokens * n:
        return INCOMPLETE, f"completion_tokens {got}, expected {max_tokens * n}"
    return OK, ""


def check_stream(events: list[str], max_tokens: int) -> tuple[str, str]:
    """A whole stream's event data: JSON chunks, a usage chunk of max_tokens, then [DONE]."""
    if not events or events[-1] != DONE:
        return INCOMPLETE, f"stream of {len(events)} events ended without [DONE]"
    usage = None
    for data in events[:-1]:
        try:
            chunk = json.loads(data)
        except ValueError:
            return INCOMPLETE, f"chunk is not JSON: {data[:200]}"
        if not isinstance(chunk, dict):
            return INCOMPLETE, f"chunk is not an object: {data[:200]}"
        if "error" in chunk:
            return INCOMPLETE, f"error event: {data[:200]}"
        if chunk.get("usage"):
            usage = chunk["usage"]
    got = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if got != max_tokens:
        return INCOMPLETE, f"completion_tokens {got}, expected {max_tokens}"
    return OK, ""


def check_refusal(status: int, body: Any, expected: int) -> tuple[str, str]:
    """A bad request: exactly the expected status and an {"error": {"message": ...}} body."""
    if status != expected:
        return UNEXPECTED_STATUS, f"HTTP {status}, expected {expected}: {str(body)[:200]}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return UNEXPECTED_STATUS, f"HTTP {status} without an error object: {str(body)[:200]}"
    return EXPECTED, f"HTTP {status}"


# --- the load ----------------------------------------------------------------------------

Result = tuple[int | None, str, str]  # status, outcome, detail


@dataclass
class LoadContext:
    client: httpx.AsyncClient  # base_url set to the server
    model: str
    prompts: PromptSource
    picker: KindPicker
    t0: float  # time.perf_counter() when the load began
    timeout_s: float  # per request, streams included


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text


async def _plain(ctx: LoadContext, rng: random.Random, chat: bool, n: int = 1) -> Result:
    max_tokens = rng.randint(MIN_TOKENS, MAX_TOKENS)
    body = generation_body(ctx.model, ctx.prompts.next(rng), chat, max_tokens, rng, n=n)
    r = await ctx.client.post(CHAT if chat else COMPLETIONS, json=body)
    return (r.status_code, *check_completion(r.status_code, _json_or_text(r), max_tokens, n))


async def _stream(
    ctx: LoadContext, rng: random.Random, chat: bool, cancel_after: int | None = None
) -> Result:
    """A stream read to its end, or, with cancel_after, closed after that many events."""
    max_tokens = MAX_TOKENS if cancel_after else rng.randint(MIN_TOKENS, MAX_TOKENS)
    body = generation_body(ctx.model, ctx.prompts.next(rng), chat, max_tokens, rng, stream=True)
    events: list[str] = []
    async with ctx.client.stream("POST", CHAT if chat else COMPLETIONS, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, UNEXPECTED_STATUS, f"HTTP {r.status_code}: {r.text[:200]}"
        decoder = SSEDecoder()
        async for line in sse_lines(r.aiter_text()):
            if (data := decoder.feed_line(line)) is None:
                continue
            events.append(data)
            if data == DONE:
                break
            if cancel_after and len(events) >= cancel_after:
                # Leaving the block closes the connection mid-body: the server sees a
                # disconnect and must abort the request and free its blocks.
                return r.status_code, OK, f"closed after {len(events)} events"
        if (last := decoder.flush()) is not None:
            events.append(last)
    if cancel_after and events and events[-1] == DONE:
        return r.status_code, OK, "finished before the client closed it"
    return (r.status_code, *check_stream(events, max_tokens))


async def _bad(ctx: LoadContext, rng: random.Random) -> Result:
    name, path, content, expected = rng.choice(bad_requests(ctx.model, ctx.prompts.next(rng)))
    headers = {"content-type": "application/json"}
    r = await ctx.client.post(path, content=content, headers=headers)
    outcome, detail = check_refusal(r.status_code, _json_or_text(r), expected)
    return r.status_code, outcome, f"{name}: {detail}"


KIND_FNS: dict[str, Callable[[LoadContext, random.Random], Awaitable[Result]]] = {
    "completion": lambda ctx, rng: _plain(ctx, rng, chat=False),
    "chat": lambda ctx, rng: _plain(ctx, rng, chat=True),
    "chat_stream": lambda ctx, rng: _stream(ctx, rng, chat=True),
    "completion_stream": lambda ctx, rng: _stream(ctx, rng, chat=False),
    "n2": lambda ctx, rng: _plain(ctx, rng, chat=rng.random() < 0.5, n=2),
    "cancel": lambda ctx, rng: _stream(
        ctx, rng, chat=rng.random() < 0.5, cancel_after=rng.randint(1, 3)
    ),
    "bad": _bad,
}
assert set(KIND_FNS) == set(KINDS)


async def run_one(ctx: LoadContext, kind: str, rng: random.Random) -> Record:
    start = time.perf_counter()
    try:
        status, outcome, detail = await asyncio.wait_for(KIND_FNS[kind](ctx, rng), ctx.timeout_s)
    except asyncio.TimeoutError:
        status, outcome, detail = None, TRANSPORT, f"no answer within {ctx.timeout_s:g} s"
    except httpx.HTTPError as e:
        status, outcome, detail = None, TRANSPORT, f"{type(e).__name__}: {e}"
    return Record(
        t=round(start - ctx.t0, 3),
        kind=kind,
        latency_s=round(time.perf_counter() - start, 4),
        status=status,
        outcome=outcome,
        detail=detail,
    )


async def worker(
    ctx: LoadContext, wid: int, seed: int, deadline: float, stop: asyncio.Event, out: list[Record]
) -> None:
    """One closed-loop user: a request at a time until `deadline` (perf_counter) or `stop`."""
    rng = random.Random(f"worker-{seed}-{wid}")
    while time.perf_counter() < deadline and not stop.is_set():
        out.append(await run_one(ctx, ctx.picker.next(), rng))
