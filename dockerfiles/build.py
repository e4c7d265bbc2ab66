"""One image build through the engine, its progress streamed to the console as it happens.

The classic builder's stream is a sequence of JSON messages: `stream` lines ("Step 3/14 : RUN ...",
" ---> Using cache", the RUN's own output), `aux` with the image id, and `error` when a step fails.
Steps are printed as they start, marked when the cache served them; a step's own output is kept and
shown only when the step fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from llmctl.dockerfiles.engine import EngineError

OUTPUT_TAIL = 20  # lines of a failed step's output worth showing


@dataclass
class BuildResult:
    image_id: str = ""
    steps: list[str] = field(default_factory=list)  # "RUN ...", in order
    cached: list[bool] = field(default_factory=list)  # per step: did the cache serve it
    seconds: float = 0.0


def build_image(client, context: Path, tag: str, console, network: str | None = "none") -> BuildResult:
    """Build context/Dockerfile as `tag`, never pulling; `network` None: the engine's default network
    (only a base without Python needs it, for its distribution's python3 package). console: the CLI's
    (`llmctl.cli.console`): steps are `info` lines, the output behind a failure always prints."""
    result, tail = BuildResult(), []
    start = time.perf_counter()
    stream = client.api.build(path=str(context), tag=tag, pull=False, rm=True, forcerm=True, decode=True,
                              network_mode=network)
    with console.status(f"building {tag}") as status:
        for message in stream:
            if "error" in message:
                shown = "\n".join(tail[-OUTPUT_TAIL:])
                if shown:
                    console.print(shown, style="dim", markup=False)
                raise EngineError(f"the build failed at {_current(result)}: {message['error'].strip()}")
            if "aux" in message and "ID" in message["aux"]:
                result.image_id = message["aux"]["ID"]
            for line in message.get("stream", "").splitlines():
                _on_line(line, result, tail, console, status)
    result.seconds = time.perf_counter() - start
    if not result.image_id:
        result.image_id = client.images.get(tag).id
    return result


def _on_line(line: str, result: BuildResult, tail: list[str], console, status) -> None:
    if line.startswith("Step "):
        instruction = escape(" ".join(line.split(" : ", 1)[-1].split()))
        result.steps.append(instruction)
        result.cached.append(False)
        tail.clear()
        status.update(f"{line.split(' : ', 1)[0]}: {instruction[:80]}")
        console.info(f"[bold]{line.split(' : ', 1)[0]}[/] {instruction}", no_wrap=True, overflow="ellipsis")
    elif line.strip() == "---> Using cache" and result.cached:
        result.cached[-1] = True
        console.info("  cached", style="dim")
    elif line.strip():
        tail.append(line)


def _current(result: BuildResult) -> str:
    return f"step {len(result.steps)} ({result.steps[-1][:80]})" if result.steps else "the start"
