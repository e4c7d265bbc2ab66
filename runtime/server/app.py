"""The OpenAI-compatible HTTP app: routes, authentication, admission, and the two ways to answer.

A generation request goes: lifecycle (503 while loading or draining) → API key → a JSON body (415 for
another content type, 413 over the size limit, 408 when it stalls, 400 for text that is not Unicode) →
model name → fields and per-request limits (protocol.py) → admission (400 over one request's share,
429 when the queue is full) → prompts as token ids off the event loop (prompts.py) → the engine
(generation.py) → a JSON body, or server-sent events ending in `[DONE]` (responses.py). A stream starts
only once every choice has its first token, so that a request the engine refuses (a prompt over the
context) still gets a plain 400 instead of an error inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import llmctl
from llmctl.runtime.async_engine import AsyncEngine
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.server.access_log import AccessLog, clip
from llmctl.runtime.server.errors import APIError, handle_api_error, handle_http_error, handle_unexpected
from llmctl.runtime.server.generation import (
    Admission,
    ClientGone,
    Generation,
    best_of,
    best_of_params,
    until_disconnected,
)
from llmctl.runtime.server.lifecycle import Lifecycle
from llmctl.runtime.server.metrics import Metrics
from llmctl.runtime.server.prompts import Prompts
from llmctl.runtime.server.protocol import (
    Limits,
    check_text,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from llmctl.runtime.server.responses import Responder, sse
from llmctl.runtime.server.settings import ServerSettings
from llmctl.runtime.server.tool_calls import detect_parser

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; only the access log sees it
PARSE_INLINE_BYTES = 256 << 10  # larger bodies are parsed in a worker thread


def build_app(engine: AsyncEngine | None, settings: ServerSettings, config: EngineConfig | None = None) -> Starlette:
    """The app for a loaded engine, or (engine None) for one still loading from `config`: attach it to
    `app.state.server` once it is there."""
    server = Server(settings, config or engine.engine.config)
    if engine is not None:
        server.attach(engine)
    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/tokenize", server.tokenize, methods=["POST"]),
        Route("/detokenize", server.detokenize, methods=["POST"]),
        Route("/tokenizer_info", server.tokenizer_info, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/ready", server.ready, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
        Route("/version", server.version, methods=["GET"]),
    ]
    handlers = {APIError: handle_api_error, HTTPException: handle_http_error, Exception: handle_unexpected}
    app = Starlette(routes=routes, middleware=[Middleware(AccessLog, on_end=server.metrics.on_http)],
                    exception_handlers=handlers)
    app.state.server = server
    return app


class EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends, even before the body
    starts (a client that leaves at once never runs the body's own cleanup)."""

    media_type = "text/event-stream"

    def __init__(self, events, generation: Generation) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


class Server:
    def __init__(self, settings: ServerSettings, config: EngineConfig) -> None:
        self.settings = settings
        self.config = config
        self.model_name = settings.served_model_name
        self.lifecycle = Lifecycle(settings.stall_timeout)
        self.engine: AsyncEngine | None = None
        self.prompts: Prompts | None = None
        self.tool_parser: str | None = None  # the model's tool-call format (tool_calls.py)
        # Admitted at once: the sequences the engine runs, plus those that queue; one request takes a share.
        self.capacity = config.max_num_seqs + settings.max_queue_len
        self.request_capacity = max(1, int(self.capacity * settings.max_request_share))
        self.admission = Admission(self.capacity)
        self.limits = Limits(settings.max_prompts, settings.max_n, settings.max_stop, settings.max_stop_chars,
                             settings.max_logprobs)
        self.metrics = Metrics(self.lifecycle, self.model_name, lambda: self.admission.in_flight,
                               settings.metrics_prefix)
        self.api_keys = [key.encode() for key in settings.api_keys]
        self.generations: set[Generation] = set()  # running ones, for the end of a shutdown's grace period
        self.created = int(time.time())

    def attach(self, engine: AsyncEngine) -> None:
        """The engine has loaded: serve."""
        self.prompts = Prompts(engine.tokenizer, engine.engine.config.max_model_len)
        template = getattr(engine.tokenizer, "chat_template", None)
        self.tool_parser = self.settings.tool_call_parser or detect_parser(template if isinstance(template, str) else None)
        self.engine = self.lifecycle.engine = engine

    def begin_drain(self) -> None:
        self.lifecycle.draining = True

    def expire(self) -> None:
        """The shutdown timeout is over: every request still running ends now, cleanly."""
        for generation in list(self.generations):
            generation.expire()

    # -- generation -----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        data, key = await self._request_body(request)
        if chat:
            req, messages = parse_chat(data, self.limits)
            num_prompts = 1
        else:
            req, messages = parse_completion(data, self.limits), None
            num_prompts = len(req.prompts)
        num_seqs = num_prompts * req.best_of
        if req.priority and self.config.scheduling_policy != "priority":
            raise APIError(400, "'priority' needs a server started with --scheduling-policy priority",
                           param="priority")
        if num_seqs > self.request_capacity:
            raise APIError(400, f"this request asks for {num_seqs} sequences (prompts x n) but one request may "
                                f"take at most {self.request_capacity} of the server's {self.capacity} "
                                "(LLMCTL_MAX_REQUEST_SHARE)", param="n")
        if not self.admission.try_admit(num_seqs):
            raise APIError(429, f"the server is at capacity ({self.admission.in_flight} sequences in "
                                "flight); retry later",
                           headers={"Retry-After": str(self.settings.retry_after)})
        access = request.state.access
        access.update(model=self.model_name, stream=req.stream, n=req.params.n, user=clip(req.user))
        if self.settings.log_prompts:
            access["prompt"] = req.raw_prompt
        try:
            tools = req.tools.functions if req.tools is not None else None
            if req.tools is not None and req.tools.choice == "auto" and self.tool_parser is None:
                raise APIError(400, "tool_choice \"auto\" needs the model's tool-call format, and this model's "
                                    "chat template names none that llmctl reads: start the server with "
                                    "--tool-call-parser (hermes, llama3_json or mistral)", param="tool_choice")
            if req.tools is not None and req.tools.choice == "auto" and self.tool_parser == "mistral":
                req.params.skip_special_tokens = False  # its [TOOL_CALLS] and [ARGS] are control tokens
            if req.params.structured is not None:
                await self._compile(req.params.structured)
            prompts = [await self.prompts.chat(messages, tools)] if chat else await self.prompts.completion(req.prompts)
        except BaseException:
            self.admission.release(num_seqs)
            raise
        generation = Generation(self.engine, prompts, best_of_params(req), uuid.uuid4().hex, self.admission,
                                self.metrics, self.generations, self._cache_salt(req.cache_salt, key), req.priority)
        responder = Responder(req, self.model_name, self.engine.tokenizer, num_prompts * req.params.n,
                              self.tool_parser)
        if req.stream:
            return await self._stream(request, generation, responder, access)
        try:
            finals = await until_disconnected(request.receive, generation.final_outputs())
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            generation.cancel()
        body = responder.response(best_of(finals, req.params.n, req.best_of))
        access.update(_token_counts(body["usage"]))
        return JSONResponse(body)

    async def _compile(self, spec) -> None:
        """Compile a structured output's grammar in a worker thread (the engine finds it cached); a 400 when
        it cannot be enforced."""
        try:
            await asyncio.to_thread(self.engine.engine.grammars.compile, spec)
        except ValueError as exc:
            param = "response_format" if spec.kind in ("json", "json_object") else "structured_outputs"
            raise APIError(400, str(exc), param=param) from None

    def _cache_salt(self, requested: str | None, key: bytes | None) -> str | None:
        """The request's own salt, under its API key's when tenants are isolated (a client's salt can never
        reach another tenant's cache, whatever it sends)."""
        if self.settings.cache_isolation == "api-key" and key is not None:
            tenant = hashlib.sha256(key).hexdigest()[:32]
            return f"{tenant}:{requested}" if requested is not None else tenant
        return requested

    async def _stream(self, request: Request, generation: Generation, responder: Responder, access: dict):
        try:
            first = await until_disconnected(request.receive, generation.first_outputs())
        except ClientGone:
            generation.cancel()
            return Response(status_code=CLIENT_CLOSED)
        except BaseException:
            generation.cancel()
            raise
        return EventStream(self._events(generation, first, responder, access), generation)

    async def _events(self, generation: Generation, first: list, responder: Responder, access: dict):
        try:
            for chunk in responder.role_chunks():
                yield sse(chunk)
            async for i, out in generation.stream(first):
                for chunk in responder.chunks(i, out):
                    yield sse(chunk)
            if responder.request.include_usage:
                yield sse(responder.usage_chunk())
            yield sse("[DONE]")
        except APIError as exc:  # the 200 is sent already: the error travels as an event, as in OpenAI's API
            access["error"] = exc.message
            access["error_code"] = exc.code
            yield sse(exc.body())
            yield sse("[DONE]")
        finally:
            generation.cancel()
            access.update(_token_counts(responder.usage()))

    def _check_serving(self) -> None:
        state, reason = self.lifecycle.state()
        if state == "loading":
            raise APIError(503, f"{reason}; retry shortly", code="model_loading",
                           headers={"Retry-After": str(self.settings.retry_after)})
        if state == "draining":
            raise APIError(503, f"{reason}; send this request elsewhere", code="server_shutting_down",
                           headers={"Connection": "close"})

    def _authorize(self, request: Request) -> bytes | None:
        """The API key the request carries (None when the server needs none), or a 401."""
        if not self.api_keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode("latin-1")
        # compare_digest takes as long for a near miss as for a far one, and every key is compared: a key
        # cannot be guessed bytewise, nor which key matched be timed.
        matches = [key for key in self.api_keys if hmac.compare_digest(sent, key)]
        if not (matches and scheme.lower() == "bearer"):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return matches[0]

    # -- the rest -------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        if request.path_params["model"] != self.model_name:
            raise APIError(404, f"The model `{request.path_params['model']}` does not exist.", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt's token ids, or a chat's as the chat template renders it."""
        what, add_special_tokens = parse_tokenize((await self._request_body(request))[0])
        if isinstance(what, str):
            tokens = (await self.prompts.completion([what], add_special_tokens))[0]
        else:
            tokens = await self.prompts.chat(what)
        return JSONResponse({"count": len(tokens), "max_model_len": self.config.max_model_len, "tokens": tokens})

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: token ids as text."""
        tokens = parse_detokenize((await self._request_body(request))[0], self.engine.engine.vocab_size)
        return JSONResponse({"prompt": await self.prompts.decode(tokens)})

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's /tokenizer_info: what a client needs to tokenize and template as the server does (lm-eval's
        remote tokenizer reads it)."""
        self._check_serving()
        self._authorize(request)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(404, "this model has no tokenizer", code="not_found")
        template = getattr(tokenizer, "chat_template", None)
        return JSONResponse({
            "tokenizer_class": type(tokenizer).__name__, "vocab_size": self.engine.engine.vocab_size,
            "model_max_length": self.config.max_model_len,
            **{name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "chat_template": template if isinstance(template, str) else None})

    async def _request_body(self, request: Request):
        """A POST's JSON body, once the server serves, the key is right and the model is this one; and the key."""
        self._check_serving()
        key = self._authorize(request)
        data = await _json(request, self.settings.max_body_bytes, self.settings.body_timeout)
        if isinstance(data, dict) and isinstance(data.get("model"), str) and data["model"] != self.model_name:
            raise APIError(404, f"The model `{clip(data['model'])}` does not exist.", param="model",
                           code="model_not_found")
        return data, key

    def _model_card(self) -> dict:
        # vLLM's card: root is where the weights came from, which benchmark tools read to find a tokenizer.
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmctl",
                "root": str(self.config.model), "parent": None, "max_model_len": self.config.max_model_len}

    async def version(self, request: Request) -> Response:
        """vLLM's /version, open to all: what benchmark reports record about the server."""
        return JSONResponse({"version": llmctl.__version__, "server": "llmctl"})

    async def health(self, request: Request) -> Response:
        """Liveness, open to all (orchestrators probe without keys): 503 when a restart would help."""
        status, body = self.lifecycle.health()
        return JSONResponse(body, status_code=status)

    async def ready(self, request: Request) -> Response:
        """Readiness, open to all: 200 only while the server takes new requests."""
        status, body = self.lifecycle.ready()
        return JSONResponse(body, status_code=status)

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _json(request: Request, limit: int, pause: float):
    """The body as JSON: 415 unless it says it is JSON (a web page can post text/plain or a form to any server
    without asking first), 413 once it passes `limit` bytes (by its header or as it streams), 408 when it
    pauses longer than `pause` seconds, 400 for invalid JSON or text that is not Unicode."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"{clip(media_type) or 'no content type'})", code="unsupported_media_type")
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                              "(LLMCTL_MAX_BODY_BYTES)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), pause)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise APIError(408, f"the request body paused for more than {pause:g} s (LLMCTL_BODY_TIMEOUT)",
                           code="request_timeout", headers={"Connection": "close"}) from None
        body += chunk
        if len(body) > limit:
            raise too_large
    if len(body) > PARSE_INLINE_BYTES:  # parsing megabytes would hold up every stream on the event loop
        return await asyncio.to_thread(_parse, body)
    return _parse(body)


def _parse(body: bytes):
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
    check_text(data)
    return data


def _token_counts(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
