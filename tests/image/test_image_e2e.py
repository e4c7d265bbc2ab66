"""End to end on a real engine: build the reference model's image on a debootstrap CPU base, run it
offline as UID 1001, get /health and a completion, run it again on a mounted model with the key from a
mounted secret file, read the image config back, and rebuild for a new model with only the model layer new. Prints image size and build times for BENCHMARKS.md."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from docker_engine import BASE_TAG, Engine, missing_requirements
from typer.testing import CliRunner

import llmctl
from llmctl.cli.main import app
from llmctl.dockerfiles.model import inspect_model
from llmctl.reference import default_model_path

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints-cpu.txt"
API_KEY = "run-time-only-key"
READY_TIMEOUT_S = 180

QUERY = """
import json, os, urllib.request
base = "http://127.0.0.1:%s" % os.environ["LLMCTL_PORT"]
health = urllib.request.urlopen(base + "/health", timeout=10)
body = json.dumps({"model": "llmctl-reference", "prompt": "def read_config(path):", "max_tokens": 16,
                   "temperature": 0}).encode()
request = urllib.request.Request(base + "/v1/completions", data=body, headers={
    "content-type": "application/json", "authorization": "Bearer " + os.environ["LLMCTL_API_KEY"]})
completion = json.loads(urllib.request.urlopen(request, timeout=60).read())
uid = [l.split()[1] for l in open("/proc/1/status") if l.startswith("Uid:")][0]
print(json.dumps({"health": health.status, "text": completion["choices"][0]["text"], "server_uid": uid}))
"""

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def engine():
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    engine = Engine()
    try:
        engine.start()
        engine.import_base()
        yield engine
    finally:
        engine.stop()


def build(engine: Engine, wheelhouse: Path, tag: str, model: Path | None = None) -> tuple[float, float]:
    """(seconds for the whole command, seconds of them in the engine's build), as build-image reports.
    One wheelhouse serves every build, so that an edit of the source tree meanwhile changes nothing."""
    args = ["build-image", *([str(model)] if model else []), "--tag", tag, "--base", BASE_TAG,
            "-c", str(CONSTRAINTS), "--wheelhouse", str(wheelhouse)]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args, env={"DOCKER_HOST": engine.host})
    assert result.exit_code == 0, result.output
    engine_s = re.search(r"GB, ([0-9.]+) s, ", " ".join(result.output.split()))
    return time.perf_counter() - start, float(engine_s.group(1))


def wait_healthy(container, healthcheck: list[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        container.reload()
        assert container.status == "running", container.logs().decode()[-2000:]
        if container.exec_run(healthcheck).exit_code == 0:
            return
        time.sleep(1)
    raise AssertionError(f"not healthy in {READY_TIMEOUT_S} s: {container.logs().decode()[-2000:]}")


def test_build_run_and_rebuild_only_the_model_layer(engine, tmp_path, capsys):
    client = engine.client()
    cold = build(engine, tmp_path / "wheelhouse", "llmctl-e2e:1")
    image = client.images.get("llmctl-e2e:1")
    config = image.attrs["Config"]

    expected = inspect_model(default_model_path())
    assert config["User"] == "1001:1001"
    assert config["Entrypoint"] == ["llmctl", "serve"] and "8000/tcp" in config["ExposedPorts"]
    assert config["Labels"]["io.llmctl.model.sha256"] == expected.sha256
    assert config["Labels"]["io.llmctl.version"] == llmctl.__version__
    assert config["Labels"]["io.llmctl.model.quantization"] == "none"
    assert config["Labels"]["org.opencontainers.image.version"] == "1"
    healthcheck = config["Healthcheck"]["Test"]
    assert healthcheck == ["CMD", "python", "-m", "llmctl.dockerfiles.healthcheck"]
    assert not any("API_KEY" in e for e in config["Env"])

    container = client.containers.run("llmctl-e2e:1", detach=True, network_mode="none", read_only=True,
                                      tmpfs={"/tmp": ""}, environment={"LLMCTL_API_KEY": API_KEY})
    try:
        wait_healthy(container, healthcheck[1:])
        done = container.exec_run(["python", "-c", QUERY])
        assert done.exit_code == 0, done.output.decode()
        answer = json.loads(done.output.decode().strip().splitlines()[-1])
        assert answer["health"] == 200 and answer["server_uid"] == "1001" and answer["text"].strip()
    finally:
        container.remove(force=True)

    # The model mounted instead of the baked one, the key from a mounted secret file (Docker's /run/secrets,
    # a Kubernetes Secret volume): LLMCTL_MODEL and LLMCTL_API_KEY_FILE.
    mounted = tmp_path / "mounted-model"
    shutil.copytree(default_model_path(), mounted)
    (mounted / "generation_config.json").write_text(json.dumps({"max_new_tokens": 8}))
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o755)
    (secret / "api-key").write_text(API_KEY + "\n")
    container = client.containers.run(
        "llmctl-e2e:1", detach=True, network_mode="none", read_only=True, tmpfs={"/tmp": ""},
        environment={"LLMCTL_MODEL": "/mnt/model", "LLMCTL_API_KEY_FILE": "/run/secrets/api-key"},
        volumes={str(mounted): {"bind": "/mnt/model", "mode": "ro"},
                 str(secret): {"bind": "/run/secrets", "mode": "ro"}})
    try:
        wait_healthy(container, healthcheck[1:])
        done = container.exec_run(["python", "-c", QUERY], environment={"LLMCTL_API_KEY": API_KEY})
        assert done.exit_code == 0, done.output.decode()
        answer = json.loads(done.output.decode().strip().splitlines()[-1])
        assert answer["health"] == 200 and answer["server_uid"] == "1001" and answer["text"].strip()
        logs = container.logs().decode()
        assert '"model": "/mnt/model"' in logs or "model=/mnt/model" in logs, logs[-2000:]
        wrong = container.exec_run(["python", "-c", QUERY], environment={"LLMCTL_API_KEY": "not-the-key"})
        assert wrong.exit_code != 0 and "401" in wrong.output.decode()
    finally:
        container.remove(force=True)

    cached = build(engine, tmp_path / "wheelhouse", "llmctl-e2e:1")
    assert client.images.get("llmctl-e2e:1").attrs["RootFS"]["Layers"] == image.attrs["RootFS"]["Layers"]

    changed = tmp_path / "changed-model"
    shutil.copytree(default_model_path(), changed)
    (changed / "generation_config.json").write_text(json.dumps({"max_new_tokens": 32}))
    model_change = build(engine, tmp_path / "wheelhouse", "llmctl-e2e:2", changed)
    first, second = image.attrs["RootFS"]["Layers"], client.images.get("llmctl-e2e:2").attrs["RootFS"]["Layers"]
    assert len(first) == len(second) and first[:-1] == second[:-1] and first[-1] != second[-1]

    with capsys.disabled():
        print(f"\n[build-image e2e] image {image.attrs['Size'] / 1e9:.2f} GB; seconds of `llmctl build-image` "
              f"(all / in the engine): cold, wheelhouse made {cold[0]:.0f} / {cold[1]:.0f}; then with the "
              f"wheelhouse reused: cached {cached[0]:.0f} / "
              f"{cached[1]:.0f}, model change {model_change[0]:.0f} / {model_change[1]:.0f}")
