"""A stand-in OpenAI server with scripted timing: to check the bench's accuracy and to find its own ceiling.

`python -m llmctl.bench.stub_server --ttft-ms 100,200 --itl-ms 25,50` answers /v1/completions and
/v1/chat/completions, streaming `max_tokens` tokens: request i's first token comes ttft[i % len] ms after its
body arrived, then token k+1 itl[k % len] ms after token k. With both at 0 every event is written at once, so
the stub costs as little as it can and the load generator is what saturates. Plain asyncio, no dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import dataclass, field

_HEAD = "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{length}Connection: keep-alive\r\n\r\n"


@dataclass
class Script:
    ttft_ms: list[float] = field(default_factory=lambda: [0.0])
    itl_ms: list[float] = field(default_factory=lambda: [0.0])
    model: str = "stub"
    served: int = 0  # requests started; request i gets ttft_ms[i % len]

    def delays(self, tokens: int) -> list[float]:
        """Seconds from the request's arrival to each token, absolute so sleep errors do not add up."""
        first = self.ttft_ms[self.served % len(self.ttft_ms)]
        self.served += 1
        at = [first]
        for k in range(tokens - 1):
            at.append(at[-1] + self.itl_ms[k % len(self.itl_ms)])
        return [ms / 1000 for ms in at]


def _event(obj) -> bytes:
    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(chat: bool, model: str, text: str | None, finish: str | None = None) -> dict:
    choice = {"index": 0, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text} if text is not None else {}
    else:
        choice["text"] = text or ""
    return {"id": "stub", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": model, "choices": [choice]}


async def _stream(writer: asyncio.StreamWriter, script: Script, body: dict, chat: bool, arrived: float) -> None:
    tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    prompt = body.get("prompt") if not chat else " ".join(m.get("content", "") for m in body.get("messages", []))
    usage = {"prompt_tokens": len(str(prompt).split()), "completion_tokens": tokens,
             "total_tokens": len(str(prompt).split()) + tokens}
    writer.write(_HEAD.format(status="200 OK", ctype="text/event-stream",
                              length="Transfer-Encoding: chunked\r\n").encode())
    loop = asyncio.get_running_loop()
    for k, at in enumerate(script.delays(tokens)):
        wait = arrived + at - loop.time()
        if wait > 0:
            await writer.drain()
            await asyncio.sleep(wait)
        writer.write(_event(_chunk(chat, script.model, f" t{k}", "length" if k == tokens - 1 else None)))
    if (body.get("stream_options") or {}).get("include_usage"):
        writer.write(_event({**_chunk(chat, script.model, None), "choices": [], "usage": usage}))
    writer.write(_event(b"[DONE]") + b"0\r\n\r\n")
    await writer.drain()


async def _respond(writer, status: str, obj) -> None:
    data = json.dumps(obj).encode()
    writer.write(_HEAD.format(status=status, ctype="application/json",
                              length=f"Content-Length: {len(data)}\r\n").encode() + data)
    await writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            arrived = asyncio.get_running_loop().time()
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
            if method == "GET" and path == "/v1/models":
                await _respond(writer, "200 OK", {"object": "list", "data": [{"id": script.model, "object": "model"}]})
            elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
                if body.get("model") != script.model:
                    await _respond(writer, "404 Not Found", {"error": {"message": f"no model {body.get('model')}"}})
                elif body.get("stream"):
                    await _stream(writer, script, body, path.endswith("chat/completions"), arrived)
                else:
                    await _respond(writer, "400 Bad Request", {"error": {"message": "the stub only streams"}})
            else:
                await _respond(writer, "404 Not Found", {"error": {"message": f"no route {method} {path}"}})
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(script: Script, host: str, port: int) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, script), host, port)
    print(f"stub serving {script.model!r} on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    parser.add_argument("--model", default="stub")
    parser.add_argument("--ttft-ms", type=_floats, default=[0.0], help="comma list, cycled per request")
    parser.add_argument("--itl-ms", type=_floats, default=[0.0], help="comma list, cycled per token")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(Script(args.ttft_ms, args.itl_ms, args.model), args.host, args.port))


if __name__ == "__main__":
    main()
