"""The engine core's own process and the typed messages that cross its boundary.

Why a process: HTTP parsing, detokenisation and SSE framing would otherwise share one Python
interpreter with the scheduler, and under load the scheduler's step rate drops. The API side
sends ``AddRequest`` / ``AbortRequests`` / ``Shutdown``; the core answers once with ``Ready``
(or ``EngineDead``) and then streams ``StepOutputs`` - one per step that produced news.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

from server.config import EngineConfig
from server.engine.outputs import EngineCoreOutput
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import SchedulerStats
from server.log_format import configure_logging

logger = logging.getLogger(__name__)


# --- API -> core -------------------------------------------------------------------------


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


# --- core -> API -------------------------------------------------------------------------


@dataclass
class Ready:
    info: object  # server.engine.core.EngineInfo (kept loose: importing core pulls in torch)


@dataclass
class EngineDead:
    message: str


@dataclass
class StepOutputs:
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


def run_engine_core(
    config: EngineConfig, inbox: Connection, outbox: Connection, log_format: str = "text"
) -> None:
    """The engine loop. Blocks on the inbox only while there is no work."""
    if threading.current_thread() is threading.main_thread():
        # Its own process: a terminal's Ctrl-C reaches the whole process group, but only the
        # API process decides when to stop (it sends Shutdown after draining HTTP).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Its own logging too, in the API process's format, so every line is alike.
        configure_logging("info", log_format)
    try:
        from server.engine.faults import FaultInjector  # imports torch: in the child only

        faults = FaultInjector.from_env()
        if faults is not None and faults.load_delay_s:
            time.sleep(faults.load_delay_s)
        from server.engine.core import EngineCore  # heavy import, in the child only

        core = EngineCore(config)
    except Exception as e:
        outbox.send(EngineDead(f"engine failed to start: {e}\n{traceback.format_exc()}"))
        return
    outbox.send(Ready(core.info))

    while True:
        # Idle: block until a message comes. Busy: take what's there and keep stepping.
        wait = None if not core.has_unfinished else 0.0
        news: list[EngineCoreOutput] = []
        changed = False
        while inbox.poll(wait):
            wait = 0.0
            try:
                msg = inbox.recv()
            except EOFError:  # the API process is gone
                return
            changed = True
            if isinstance(msg, AddRequest):
                err = core.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                if err is not None:
                    news.append(err)
            elif isinstance(msg, AbortRequests):
                news.extend(core.abort(msg.request_ids))
            elif isinstance(msg, Shutdown):
                return
            else:
                logger.error("engine core: unknown message %r", msg)
        if core.has_unfinished:
            news.extend(core.step())
            changed = True
        if news or changed:
            outbox.send(StepOutputs(news, core.stats()))
