"""The FastAPI app (`build_app`) and the daemon's main coroutine (`serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from server import metrics
from server.api.auth import APIKeyMiddleware
from server.api.body_limit import BodyLimitMiddleware
from server.api.drain import DrainingServer, DrainState
from server.api.errors import error_response, install_error_handlers
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.request_id import RequestIdMiddleware
from server.api.serving import ServingContext
from server.api.serving_chat import ChatServer
from server.api.serving_completions import CompletionServer
from server.api.serving_tokenize import TokenizeServer
from server.api.startup_gate import StartupGate
from server.config import ServerConfig, SpecdConfig
from server.engine.client import AsyncEngineClient
from server.log_format import uvicorn_log_config

logger = logging.getLogger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("specd")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def build_app(
    client: AsyncEngineClient, server_config: ServerConfig, drain: DrainState | None = None
) -> FastAPI:
    """The HTTP app over a started engine client. The caller owns the client's lifetime;
    ``drain`` is the server's drain state (see drain.py), None when nothing drains it."""
    app = FastAPI(title="specd", version=_version())
    install_error_handlers(app)
    registry = metrics.build_registry(client.model_name, client.stats)
    rejections = metrics.RejectionCounter(registry, client.model_name)
    app.state.rejections = rejections
    client.observer = metrics.RequestMetrics(registry, client.model_name, client.max_model_len)
    # Added first = innermost: a bad API key is refused before the body is even read.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=server_config.max_request_body_bytes,
        on_reject=lambda: rejections.inc("body_too_large"),
    )
    if server_config.api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=server_config.api_keys)
    app.add_middleware(RequestIdMiddleware)  # even a 401 or 413 echoes the id
    if server_config.allowed_origins:
        # Outermost: a browser's preflight (OPTIONS, no API key) is answered here, and every
        # response, errors included, carries the headers a browser needs to read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(server_config.allowed_origins),
            allow_methods=list(server_config.allowed_methods),
            allow_headers=list(server_config.allowed_headers),
            allow_credentials=server_config.allow_credentials,
            expose_headers=["X-Request-Id", "Retry-After"],
        )

    ctx = ServingContext(client, server_config, drain or DrainState())
    metrics.register_admission_gauges(
        registry,
        client.model_name,
        lambda: ctx.admission.queued_requests,
        lambda: ctx.admission.queued_tokens,
    )
    completions = CompletionServer(ctx)
    chat = ChatServer(ctx)
    tokenizer = TokenizeServer(ctx)
    app.state.serving = ctx

    def model_card() -> ModelCard:
        return ModelCard(id=ctx.model_name, root=ctx.model_name, max_model_len=ctx.max_model_len)

    @app.get("/health")
    async def health() -> Response:
        if client.is_healthy():
            return Response(status_code=200)
        return error_response("The engine is not running", 503)

    @app.get("/ready")
    async def ready() -> Response:
        """Whether to send this replica traffic: not while it drains (health stays 200)."""
        if ctx.drain.draining:
            return error_response("The server is draining", 503, code="draining")
        return await health()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard)
    async def retrieve_model(model_id: str) -> ModelCard:
        ctx.check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(body, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await chat.create(body, raw_request)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return tokenizer.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return tokenizer.detokenize(body)

    return app


async def serve(config: SpecdConfig) -> None:
    """Serves HTTP from the start (see startup_gate.py), starts the engine, opens the real app
    once the engine is up, and runs until SIGINT/SIGTERM; then shuts the engine down."""
    drain = DrainState()
    gate = StartupGate(drain, _version())
    client: AsyncEngineClient | None = None  # once the engine has started
    server = DrainingServer(
        uvicorn.Config(
            gate,
            host=config.server.host,
            port=config.server.port,
            log_level=config.server.log_level,
            log_config=uvicorn_log_config(config.server.log_format),
            # One line per request costs API-process CPU that streaming needs under load.
            access_log=config.server.log_level == "debug",
            timeout_graceful_shutdown=5,
        ),
        drain,
        lambda: client.num_in_flight if client is not None else 0,
        config.server.shutdown_timeout_s,
    )
    http = asyncio.create_task(server.serve(), name="http")
    starting = asyncio.create_task(
        AsyncEngineClient.start(config.engine, config.server.log_format), name="engine-start"
    )
    try:
        await asyncio.wait({http, starting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # HTTP stopped (SIGTERM, SIGINT, port taken) during the load
            starting.cancel()
            logger.info("stopped while the model was loading")
            await http
            return
        client = starting.result()  # raises if the engine failed to start
        gate.open(build_app(client, config.server, drain))
        logger.info(
            "serving %s on http://%s:%d", client.model_name, config.server.host, config.server.port
        )
        await http
    finally:
        if client is not None:
            client.shutdown_now()
        else:  # the engine failed to start, or the load was interrupted
            starting.cancel()
            server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await http
