"""The build context: a rendered Dockerfile, the wheelhouse and the model, and nothing else.

Nothing from the host's environment is rendered into it (no API key, no pip credentials): the API key
reaches the server only at run time, through LLMCTL_API_KEY.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import llmctl
from llmctl.dockerfiles.base import BaseImage
from llmctl.dockerfiles.cuda import driver_requirement
from llmctl.dockerfiles.model import ModelInfo

UID = 1001
PORT = 8000
VENV = "/opt/llmctl"
MODEL_DIR = "/opt/model"
KERNEL_CONFIGS_DIR = "/opt/llmctl-kernel-configs"  # what LLMCTL_W4A16_CONFIGS names in the image
LABEL_PREFIX = "io.llmctl"


@dataclass(frozen=True)
class ImageSpec:
    """Everything the Dockerfile depends on; `created` is the one field that changes on every build."""

    name: str  # repository part of the tag
    version: str  # tag part
    base: BaseImage
    model: ModelInfo
    llmctl_wheel: str
    pip_wheel: str
    created: str = ""
    cuda: str | None = None  # the CUDA release the wheels' torch runs on (cuda.py); None for a CPU torch
    kernel_configs: tuple[tuple[Path, str], ...] = ()  # (W4A16 tuned file, its GPU) to bake in

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def parse_tag(tag: str) -> tuple[str, str]:
    """NAME:VERSION, both required (a registry host's port is part of NAME: host:5000/app:1.0)."""
    name, sep, version = tag.rpartition(":")
    if not sep or not name or not version or "/" in version:
        raise ValueError(f"--tag must be NAME:VERSION, got {tag!r}")
    if name != name.lower() or " " in tag:
        raise ValueError(f"image names are lower case without spaces, got {tag!r}")
    return name, version


def labels(spec: ImageSpec) -> dict[str, str]:
    """OCI annotations plus what identifies the served model; read back with `docker inspect`."""
    quantization = spec.model.quantization
    return {
        "org.opencontainers.image.title": spec.name.rsplit("/", 1)[-1],
        "org.opencontainers.image.version": spec.version,
        "org.opencontainers.image.created": spec.created or _now(),
        "org.opencontainers.image.description": f"llmctl serve with {spec.model.served_name} baked in",
        "org.opencontainers.image.base.name": spec.base.name,
        "org.opencontainers.image.licenses": "Apache-2.0",
        f"{LABEL_PREFIX}.version": llmctl.__version__,
        f"{LABEL_PREFIX}.model.name": spec.model.served_name,
        f"{LABEL_PREFIX}.model.sha256": spec.model.sha256,
        f"{LABEL_PREFIX}.model.quantization": label_json(quantization) if quantization else "none",
        f"{LABEL_PREFIX}.cuda": spec.cuda or "none",
        f"{LABEL_PREFIX}.requires": driver_requirement(spec.cuda),
        **({f"{LABEL_PREFIX}.kernel-configs": ", ".join(gpu for _, gpu in spec.kernel_configs)}
           if spec.kernel_configs else {}),
    }


def label_json(value) -> str:
    """Compact JSON whose strings hold no `"` or `\\` escapes (\\u0022 and \\u005c instead, the same JSON):
    hadolint's parser rejects an escaped backslash before an escaped quote, which Docker accepts."""
    return re.sub(r'\\(["\\])', lambda m: f"\\u{ord(m.group(1)):04x}",
                  json.dumps(value, sort_keys=True, separators=(",", ":")))


def render_dockerfile(spec: ImageSpec) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("llmctl.dockerfiles", "."),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["dquote"] = dquote
    return env.get_template("Dockerfile.j2").render(
        version=llmctl.__version__, base=spec.base.name, install_python=spec.base.install_python,
        uid=UID, port=PORT, venv=VENV, model_dir=MODEL_DIR, served_model_name=spec.model.served_name,
        llmctl_wheel=spec.llmctl_wheel, pip_wheel=spec.pip_wheel, labels=labels(spec),
        kernel_configs_dir=KERNEL_CONFIGS_DIR if spec.kernel_configs else None)


def write_context(dest: Path, spec: ImageSpec) -> Path:
    """Copy the model into `dest` (the wheelhouse is already in dest/wheels) and write the Dockerfile."""
    model_dest = dest / "model"
    if model_dest.exists():
        shutil.rmtree(model_dest)
    for relative in spec.model.files:
        target = model_dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.model.path / relative, target)
        target.chmod(0o644)  # root owns the model in the image; UID 1001 needs to read it, whatever its mode
    for directory in (model_dest, *(p for p in model_dest.rglob("*") if p.is_dir())):
        directory.chmod(0o755)
    configs_dest = dest / "kernel-configs"
    if configs_dest.exists():
        shutil.rmtree(configs_dest)
    for i, (path, _) in enumerate(spec.kernel_configs):
        configs_dest.mkdir(mode=0o755, exist_ok=True)
        target = configs_dest / f"{i}-{path.name}"
        shutil.copyfile(path, target)
        target.chmod(0o644)
    (dest / ".dockerignore").write_text("**/.*\n")
    dockerfile = dest / "Dockerfile"
    dockerfile.write_text(render_dockerfile(spec))
    return dockerfile


def dquote(value: str) -> str:
    """A Dockerfile double-quoted word: escapes quotes, backslashes and `$` (LABEL and ENV expand it)."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
