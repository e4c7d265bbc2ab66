"""Fixtures for the image tests: specs rendered without pip or an engine, and the `docker` marker.

Tests marked `docker` start a real dockerd and build real images (minutes, root, debootstrap): they run
only when asked for with `-m docker` (their own nox session), never in the default suite.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmctl.dockerfiles.base import BaseImage, assumed_base
from llmctl.dockerfiles.context import ImageSpec
from llmctl.dockerfiles.model import inspect_model
from llmctl.reference import default_model_path

LOCAL_BASE = BaseImage("llmctl-test-base:bookworm", "3.11", glibc="2.36")
QUANTIZED = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq", "note": 'a "quoted" $HOME \\ value'}


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: builds and runs images on a real dockerd it starts "
                                       "(root, docker.io, debootstrap); run with -m docker")


def pytest_collection_modifyitems(config, items):
    if "docker" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="builds real images: run with -m docker (nox -s image)")
    for item in items:
        if "docker" in item.keywords:
            item.add_marker(skip)


def make_spec(model_dir: Path | None = None, base: BaseImage = LOCAL_BASE, served_name: str | None = None,
              tag: tuple[str, str] = ("llmctl-ref", "0.1.0")) -> ImageSpec:
    model = inspect_model(model_dir or default_model_path(), served_name or ("llmctl-reference"
                                                                             if model_dir is None else None))
    return ImageSpec(*tag, base=base, model=model, llmctl_wheel="llmctl-0.1.0-py3-none-any.whl",
                     pip_wheel="pip-26.3-py3-none-any.whl", created="2026-11-21T00:00:00Z")


@pytest.fixture
def quantized_model(tmp_path) -> Path:
    """A model directory with a quantization_config, a hidden secret and a nested tokenizer file."""
    model = tmp_path / "tiny-gptq"
    model.mkdir()
    source = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(source / name, model / name)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": QUANTIZED}))
    (model / ".env").write_text("LLMCTL_API_KEY=sk-do-not-bake\n")
    (model / ".cache").mkdir()
    (model / ".cache" / "token").write_text("hf_do_not_bake\n")
    (model / "extra").mkdir()
    (model / "extra" / "notes.txt").write_text("kept\n")
    (model / "model.safetensors").chmod(0o600)
    return model


@pytest.fixture(params=["local", "cuda-default", "quantized"])
def any_spec(request, quantized_model) -> ImageSpec:
    """Every kind of Dockerfile the builder renders: each must pass hadolint."""
    if request.param == "cuda-default":
        return make_spec(base=assumed_base("nvidia/cuda:13.0.1-runtime-ubuntu24.04", None))
    if request.param == "quantized":
        return make_spec(quantized_model, tag=("registry.example:5000/team/tiny-gptq", "2026.11.21"))
    return make_spec()
