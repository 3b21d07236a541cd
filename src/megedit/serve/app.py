"""The HTTP API: OpenAI-style completions over a served run, its edits, its health, and reload.

    app = create_app(load_engine("runs/smollm2-zsre-1024", ServeOptions()), ServeOptions())

Every answer goes through the batcher; every error is a JSON ``{"error": {...}}`` (errors.py). The engine
is swapped, never mutated: a reload loads the new run beside the old one and replaces the reference, so
the batch in the model thread ends on the engine it started with and the next batch takes the new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from megedit.artifacts import ArtifactError
from megedit.serve.batcher import Batcher, BatchFailed, QueueFull
from megedit.serve.engine import Answer, Engine
from megedit.serve.errors import (CONFLICT, OVERLOADED, SERVER_ERROR, ApiError, error_response,
                                  install_error_handlers)
from megedit.serve.options import ServeOptions
from megedit.serve.validation import Query, parse_chat, parse_completion, parse_page, parse_reload

log = logging.getLogger(__name__)
# Far above any valid request (max_batch prompts of max_prompt_chars, or a long chat history): a bound
# on what one client can make the server buffer, not a limit a real request meets.
MAX_BODY_BYTES = 4 << 20
EngineLoader = Callable[[str], Engine]  # run folder -> a warmed-up engine; runs in a background thread
# What a loader raises for a run that cannot be served (missing, incomplete, from mixed runs, a model spec
# in error): the caller's fault, a 400. Anything else is the server's, a 500; either way the old run serves on.
BAD_RUN_ERRORS: tuple[type[BaseException], ...] = (ArtifactError, OSError, ValueError)


class ServerState:
    """The engine being served (swapped by reload) and the batcher that feeds it."""

    def __init__(self, engine: Engine, options: ServeOptions, loader: EngineLoader | None):
        self.engine, self.options, self.loader = engine, options, loader
        self.batcher: Batcher[Query, Answer] = Batcher(self._answer_batch, options.max_batch,
                                                       options.batch_window_ms / 1000, options.max_queued_requests)
        self.reload_lock = asyncio.Lock()
        self.started_at = time.time()

    def _answer_batch(self, queries: list[Query]) -> list[Answer]:
        return self.engine.answer(queries)  # read once per batch: a reload takes effect between batches

    async def answer(self, queries: list[Query]) -> list[Answer]:
        try:
            return await self.batcher.submit(queries)
        except QueueFull as exc:
            raise ApiError(f"the server is overloaded ({exc}); retry later", None, 503, OVERLOADED) from None
        except BatchFailed as exc:
            raise ApiError(f"the model failed on this request's batch: {exc}", None, 500, SERVER_ERROR) from None

    async def reload(self, run: str) -> dict:
        if self.loader is None:
            raise ApiError("this server was started without a run loader, so it cannot reload", None, 501)
        if self.reload_lock.locked():
            raise ApiError("a reload is already in progress", None, 409, CONFLICT)
        async with self.reload_lock:
            t0 = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self.loader, run)
            except BAD_RUN_ERRORS as exc:
                raise ApiError(f"cannot load run {run}: {exc}", "run", 400) from None
            except Exception as exc:  # noqa: BLE001 - a failed reload leaves the old run serving
                log.exception("reload of %s failed", run)
                raise ApiError(f"reloading {run} failed: {type(exc).__name__}: {exc}", "run", 500,
                               SERVER_ERROR) from None
            previous, self.engine = self.engine, engine
        log.info("reloaded: %s -> %s", previous.run, engine.run)
        return {"status": "reloaded", "seconds": round(time.perf_counter() - t0, 3),
                "previous": previous.describe(), "current": engine.describe()}


async def _read_body(request: Request) -> bytes:
    """The body, refused with a 413 as soon as it outgrows MAX_BODY_BYTES (never held whole in memory)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(f"the request body exceeds {MAX_BODY_BYTES} bytes", None, 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, required: bool = True) -> Any:
    raw = await _read_body(request)
    if not raw.strip():
        if required:
            raise ApiError("the request body is empty; send a JSON object")
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None


def _usage(answers: list[Answer]) -> dict:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _envelope(kind: str, prefix: str, answers: list[Answer], choices: list[dict]) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": answers[0].model, "choices": choices, "usage": _usage(answers),
            "megedit": {"batch_size": answers[0].batch_size}}


def create_app(engine: Engine, options: ServeOptions | None = None, loader: EngineLoader | None = None) -> FastAPI:
    """The server over ``engine``; ``loader`` (run folder -> Engine) enables POST /admin/reload."""
    state = ServerState(engine, options or ServeOptions(), loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        yield
        await state.batcher.stop()

    app = FastAPI(title="megedit", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.megedit = state
    install_error_handlers(app)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(f"internal error: {type(exc).__name__}: {exc}", None, 500, SERVER_ERROR))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **state.engine.describe(), "queued_requests": state.batcher.queued,
                "batching": state.batcher.stats.as_dict(), "reloading": state.reload_lock.locked(),
                "uptime_s": round(time.time() - state.started_at, 1)}

    @app.get("/v1/models")
    async def models() -> dict:
        e = state.engine
        return {"object": "list", "data": [{"id": e.name, "object": "model", "created": int(e.loaded_at),
                                            "owned_by": "megedit"}]}

    @app.get("/v1/edits")
    async def edits(offset: str | None = None, limit: str | None = None) -> dict:
        start, count = parse_page(offset, limit)
        e = state.engine
        return {"object": "list", "run": e.run, "total": e.n_edits, "offset": start, "limit": count,
                "data": e.edits(start, count)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        answers = await state.answer(parse_completion(await _json_body(request), state.options))
        choices = [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason,
                    "megedit": a.provenance} for i, a in enumerate(answers)]
        return _envelope("text_completion", "cmpl", answers, choices)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict:
        answers = await state.answer(parse_chat(await _json_body(request), state.options))
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "finish_reason": a.finish_reason, "megedit": a.provenance} for i, a in enumerate(answers)]
        return _envelope("chat.completion", "chatcmpl", answers, choices)

    @app.post("/admin/reload")
    async def reload(request: Request) -> dict:
        run = parse_reload(await _json_body(request, required=False))
        return await state.reload(run or state.engine.run)

    return app
