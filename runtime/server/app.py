"""The OpenAI-compatible HTTP app: routes, authentication, admission, and the two ways to answer.

A generation request goes: API key → JSON → model name → fields (protocol.py) → admission (429 when the
queue is full) → the engine (generation.py) → a JSON body, or server-sent events ending in `[DONE]`
(responses.py). A stream starts only once every choice has its first token, so that a request the engine
refuses (a prompt over the context) still gets a plain 400 instead of an error inside a 200 stream.
"""

from __future__ import annotations

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

from llmctl.runtime.async_engine import AsyncEngine
from llmctl.runtime.server.access_log import AccessLog
from llmctl.runtime.server.errors import APIError, handle_api_error, handle_http_error, handle_unexpected
from llmctl.runtime.server.generation import Admission, ClientGone, Generation, until_disconnected
from llmctl.runtime.server.metrics import Metrics
from llmctl.runtime.server.protocol import GenerationRequest, parse_chat, parse_completion
from llmctl.runtime.server.responses import Responder, sse
from llmctl.runtime.server.settings import ServerSettings

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; only the access log sees it


def build_app(engine: AsyncEngine, settings: ServerSettings) -> Starlette:
    server = Server(engine, settings)
    routes = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    handlers = {APIError: handle_api_error, HTTPException: handle_http_error, Exception: handle_unexpected}
    app = Starlette(routes=routes, middleware=[Middleware(AccessLog)], exception_handlers=handlers)
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
    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = settings.served_model_name
        # Admitted at once: the sequences the engine runs, plus those that queue.
        self.capacity = engine.engine.config.max_num_seqs + settings.max_queue_len
        self.admission = Admission(self.capacity)
        self.metrics = Metrics(engine, self.model_name, lambda: self.admission.in_flight)
        self.api_keys = [key.encode() for key in settings.api_keys]
        self.created = int(time.time())

    # -- generation -----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, lambda data: parse_chat(data, self._render_chat))

    async def _generate(self, request: Request, parse) -> Response:
        self._authorize(request)
        data = await _json(request, self.settings.max_body_bytes)
        if isinstance(data, dict) and isinstance(data.get("model"), str) and data["model"] != self.model_name:
            raise APIError(404, f"The model `{data['model']}` does not exist.", param="model",
                           code="model_not_found")
        req: GenerationRequest = parse(data)
        num_seqs = len(req.prompts) * req.params.n
        if num_seqs > self.capacity:
            raise APIError(400, f"this request asks for {num_seqs} sequences (prompts x n) but the server "
                                f"admits at most {self.capacity} at once", param="n")
        if not self.admission.try_admit(num_seqs):
            raise APIError(429, f"the server is at capacity ({self.admission.in_flight} sequences in "
                                "flight); retry later",
                           headers={"Retry-After": str(self.settings.retry_after)})
        access = request.state.access
        access.update(model=self.model_name, stream=req.stream, n=req.params.n, user=req.user)
        if self.settings.log_prompts:
            access["prompt"] = req.raw_prompt
        generation = Generation(self.engine, req.prompts, req.params, uuid.uuid4().hex, self.admission,
                                self.metrics)
        responder = Responder(req, self.model_name, self.engine.tokenizer, generation.num_choices)
        if req.stream:
            return await self._stream(request, generation, responder, access)
        try:
            finals = await until_disconnected(request.receive, generation.final_outputs())
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            generation.cancel()
        body = responder.response(finals)
        access.update(_token_counts(body["usage"]))
        return JSONResponse(body)

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
                chunk = responder.chunk(i, out)
                if chunk is not None:
                    yield sse(chunk)
            if responder.request.include_usage:
                yield sse(responder.usage_chunk())
            yield sse("[DONE]")
        except APIError as exc:  # the 200 is sent already: the error travels as an event, as in OpenAI's API
            access["error"] = exc.message
            yield sse(exc.body())
            yield sse("[DONE]")
        finally:
            generation.cancel()
            access.update(_token_counts(responder.usage()))

    def _render_chat(self, messages: list[dict]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.model_name} has no chat template; use /v1/completions")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template is the model's code: what it rejects is these messages
            raise APIError(400, f"the chat template cannot render these messages: {exc}",
                           param="messages") from exc
        # The template writes the special tokens it wants (BOS included); encoding must not add them again.
        return tokenizer.encode(text, add_special_tokens=False)

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode("latin-1")
        # compare_digest takes as long for a near miss as for a far one: a key cannot be guessed bytewise.
        valid = sum(hmac.compare_digest(sent, key) for key in self.api_keys) > 0
        if not (valid and scheme.lower() == "bearer"):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

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

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmctl",
                "max_model_len": self.engine.engine.config.max_model_len}

    async def health(self, request: Request) -> Response:
        """Open to all: load balancers and orchestrators probe it without keys."""
        if self.engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped"}, status_code=503)  # the cause is in the server log

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _json(request: Request, limit: int):
    """The body as JSON, refused with 413 once it passes `limit` bytes (by its header or as it streams)."""
    too_large = APIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                              "(LLMCTL_MAX_BODY_BYTES)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc


def _token_counts(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
