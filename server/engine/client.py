"""The API side of the engine: starts the core process, streams per-request outputs.

``generate`` is an async generator per request. It turns the core's token-id outputs into text
(incremental detokenisation and stop strings happen here, off the engine's interpreter), and
closing it early - a client disconnect cancels the task that iterates it - aborts the request
in the core, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from server.config import EngineConfig
from server.engine.core_proc import (
    AbortRequests,
    AddRequest,
    EngineDead,
    Ready,
    Shutdown,
    StepOutputs,
    run_engine_core,
)
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import EngineCoreOutput, RequestOutput
from server.engine.request_timing import RequestObserver, RequestTiming
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerStats
from server.model.loader import resolve_model

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


# How often a reader waiting on the core checks that the core is still alive.
_LIVENESS_POLL_S = 0.5


def _recv_while_alive(
    conn: Connection, worker: mp.process.BaseProcess | threading.Thread
) -> object:
    """conn.recv(), but raises EOFError once the worker is gone and nothing is left to read,
    should the pipe itself not report it (another process still holding its write end)."""
    while not conn.poll(_LIVENESS_POLL_S):
        if not worker.is_alive():
            if conn.poll(0):
                break
            raise EOFError("the engine core exited")
    return conn.recv()


@dataclass
class _Stream:
    """Per-request state on the API side."""

    queue: asyncio.Queue[EngineCoreOutput | Exception]
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)


class AsyncEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: PreTrainedTokenizerBase,
        info: object,
        inbox: Connection,
        outbox: Connection,
        worker: mp.process.BaseProcess | threading.Thread,
    ) -> None:
        self.config = config
        self.model_name = config.model.name
        self.tokenizer = tokenizer
        self.max_model_len: int = info.max_model_len  # type: ignore[attr-defined]
        self.eos_token_ids: frozenset[int] = info.eos_token_ids  # type: ignore[attr-defined]
        self.vocab_size: int = info.vocab_size  # type: ignore[attr-defined]
        self.num_blocks: int = info.num_blocks  # type: ignore[attr-defined]
        self._to_core = inbox
        self._from_core = outbox
        self._worker = worker
        self._streams: dict[str, _Stream] = {}
        self._stats = SchedulerStats(num_blocks_total=self.num_blocks)
        # Told each request's token gaps and timeline (the API's latency histograms).
        self.observer: RequestObserver | None = None
        self._dead: str | None = None
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(
            target=self._read_outputs, name="engine-reader", daemon=True
        )
        self._reader.start()

    # --- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def start(cls, config: EngineConfig, log_format: str = "text") -> AsyncEngineClient:
        """Resolves (and on first use converts) the model, then starts the engine core (whose
        own process logs in ``log_format``, as the API process does)."""
        model_dir = await asyncio.to_thread(resolve_model, config.model.model)
        # The core loads the resolved directory: conversion happens once, here, with progress.
        config = replace(
            config,
            model=replace(config.model, model=str(model_dir), served_model_name=config.model.name),
        )
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        core_in_recv, core_in_send = mp.Pipe(duplex=False)
        core_out_recv, core_out_send = mp.Pipe(duplex=False)
        worker: mp.process.BaseProcess | threading.Thread
        if config.separate_process:
            worker = mp.get_context("spawn").Process(
                target=run_engine_core,
                args=(config, core_in_recv, core_out_send, log_format),
                name="specd-engine-core",
                daemon=True,
            )
        else:
            worker = threading.Thread(
                target=run_engine_core,
                args=(config, core_in_recv, core_out_send),
                name="specd-engine-core",
                daemon=True,
            )
        worker.start()
        if config.separate_process:
            # The child holds these ends now. Closing ours means the child's death closes the
            # output pipe for good, so the reader sees EOF instead of waiting forever.
            core_in_recv.close()
            core_out_send.close()
        try:
            first = await asyncio.to_thread(_recv_while_alive, core_out_recv, worker)
        except BaseException:
            # Cancelled while the model loads (the server stops before it is ready): end the
            # core so the thread waiting on it returns, and the process can exit.
            if isinstance(worker, mp.process.BaseProcess):
                worker.kill()
            else:
                with contextlib.suppress(OSError):
                    core_in_send.send(Shutdown())
            raise
        if isinstance(first, EngineDead):
            raise EngineDeadError(first.message)
        assert isinstance(first, Ready)
        return cls(config, tokenizer, first.info, core_in_send, core_out_recv, worker)

    async def shutdown(self) -> None:
        self.shutdown_now()

    def shutdown_now(self, timeout: float = 10.0) -> None:
        """Stops the engine core. Synchronous on purpose: it runs while uvicorn re-raises the
        SIGINT it caught, when an awaited shutdown would be cancelled half-way."""
        if self._dead is None:
            self._dead = "shut down"
            with contextlib.suppress(OSError):
                self._to_core.send(Shutdown())
        self._worker.join(timeout)
        if isinstance(self._worker, mp.process.BaseProcess) and self._worker.is_alive():
            self._worker.kill()

    def is_healthy(self) -> bool:
        return self._dead is None and self._worker.is_alive()

    @property
    def num_in_flight(self) -> int:
        """Engine requests whose streams have not ended (a drain waits for 0)."""
        return len(self._streams)

    def stats(self) -> SchedulerStats:
        return self._stats

    # --- requests ----------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        stream = _Stream(
            queue=asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(self.tokenizer, params, prompt_token_ids),
        )
        self._streams[request_id] = stream
        finished = False
        timing = RequestTiming(arrival=time.monotonic(), num_prompt_tokens=len(prompt_token_ids))
        try:
            self._to_core.send(AddRequest(request_id, list(prompt_token_ids), params))
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                out = self._to_request_output(stream, item)
                self._time(timing, item, out)
                finished = out.finished
                if finished and item.finish_reason is None:
                    # A stop string ended it here; the core is still generating: stop it.
                    self._send_abort(request_id)
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send_abort(request_id)
                timing.finish_reason = "abort"
            if self.observer is not None:
                timing.finished = time.monotonic()
                self.observer.finished(timing)

    def _time(self, timing: RequestTiming, item: EngineCoreOutput, out: RequestOutput) -> None:
        now = time.monotonic()
        if timing.first_scheduled is None:
            timing.first_scheduled = item.first_scheduled_time
        gap = timing.tokens_arrived(now, len(out.new_token_ids))
        if gap is not None and self.observer is not None:
            self.observer.inter_token(gap)
        if out.finished:
            timing.finish_reason = "abort" if out.error else out.finish_reason

    async def abort(self, request_id: str) -> None:
        self._send_abort(request_id)

    def _send_abort(self, request_id: str) -> None:
        if self._dead is None:
            with contextlib.suppress(OSError):  # the core is gone: nothing left to abort
                self._to_core.send(AbortRequests([request_id]))

    def _to_request_output(self, stream: _Stream, item: EngineCoreOutput) -> RequestOutput:
        update = stream.detokenizer.update(item.new_token_ids, finished=item.finished)
        new_ids = item.new_token_ids[: update.num_new_tokens_kept]
        stream.token_ids.extend(new_ids)
        finish_reason, stop_reason = item.finish_reason, item.stop_reason
        if update.stopped:
            finish_reason, stop_reason = "stop", update.stop_string
        logprobs = item.new_logprobs[: len(new_ids)] if item.new_logprobs is not None else None
        return RequestOutput(
            request_id=item.request_id,
            new_token_ids=new_ids,
            new_text=update.new_text,
            new_logprobs=logprobs,
            prompt_logprobs=item.prompt_logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_prompt_tokens=item.num_prompt_tokens,
            num_cached_tokens=item.num_cached_tokens,
            num_output_tokens=stream.detokenizer.num_tokens,
            num_draft_tokens=item.num_draft_tokens,
            num_accepted_tokens=item.num_accepted_tokens,
            text=stream.detokenizer.text,
            token_ids=stream.token_ids,
            error=item.error,
        )

    # --- the reader thread -------------------------------------------------------------------

    def _read_outputs(self) -> None:
        """Moves the core's outputs onto the event loop, one call per step batch."""
        while True:
            try:
                msg = _recv_while_alive(self._from_core, self._worker)
            except Exception:  # EOF, a closed pipe, or a torn message as the core exits
                if self._dead is None and not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(self._on_core_gone)
                return
            if isinstance(msg, StepOutputs):
                self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: StepOutputs) -> None:
        self._stats = msg.stats
        for out in msg.outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:  # None: the client went away and we aborted it
                stream.queue.put_nowait(out)

    def _on_core_gone(self) -> None:
        if self._dead is None:
            self._dead = "the engine core process exited"
            logger.error(self._dead)
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(self._dead))
