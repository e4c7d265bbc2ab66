"""The model that goes into an image: checked before anything is built, and identified by a digest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class ModelInfo:
    """What the image's labels say about the model, and which files the model layer holds.

    `sha256` digests the whole directory, not one file: it hashes the sorted lines
    `<sha256 of file>  <relative path>` (sha256sum's format), so that any changed, added or renamed file
    changes it and `sha256sum` can recompute it by hand.
    """

    path: Path
    files: tuple[Path, ...]  # relative to path
    sha256: str
    quantization: dict | None  # config.json's quantization_config, None for a dense model
    served_name: str


def inspect_model(path: str | Path, served_name: str | None = None) -> ModelInfo:
    """Check that `path` is a model directory (config.json + safetensors) and describe it.

    Hidden files (`.env`, `.git`, `.cache`, ...) are left out of the image: they are where credentials
    live, never model data. Raises ValueError with a one-line message for an invalid directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model directory {root} does not exist")
    config = _read_config(root)
    files = tuple(sorted(p.relative_to(root) for p in root.rglob("*")
                         if p.is_file() and not _hidden(p.relative_to(root))))
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        raise ValueError(f"{root} is not a model directory: it has no *.safetensors weights")
    return ModelInfo(path=root, files=files, sha256=directory_sha256(root, files),
                     quantization=config.get("quantization_config"),
                     served_name=served_name or root.resolve().name)


def directory_sha256(root: Path, files: tuple[Path, ...]) -> str:
    lines = "".join(f"{_file_sha256(root / f)}  {f.as_posix()}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _read_config(root: Path) -> dict:
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"{root} is not a model directory: it has no config.json")
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not (data.get("model_type") or data.get("architectures")):
        raise ValueError(f"{config} names no model_type or architectures")
    return data


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
