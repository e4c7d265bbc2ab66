"""`llmctl build-image` through typer's runner: one-line errors, and a context without an engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli.main import app

runner = CliRunner()


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def no_pip(monkeypatch):
    """Stand in for the wheelhouse (pip takes half a minute); the CLI's own logic is under test."""
    def fake(dest: Path, base, constraints=None, on_progress=None):
        if on_progress is not None:
            on_progress("1 packages: resolving llmctl")  # the spinner's update, also under --quiet
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("llmctl-0.1.0-py3-none-any.whl", "pip-26.3-py3-none-any.whl"):
            (dest / name).write_bytes(b"")
        fake.bases.append(base)
        return "llmctl-0.1.0-py3-none-any.whl", "pip-26.3-py3-none-any.whl"

    fake.bases = []
    monkeypatch.setattr("llmctl.dockerfiles.wheelhouse.build_wheelhouse", fake)
    return fake


def test_help_imports_no_heavy_library():
    code = ("import sys, llmctl.cli.main, llmctl.cli.build_image; "
            "print(sorted(m for m in ('torch', 'transformers', 'docker', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_invalid_model_directory_is_one_line(tmp_path):
    line = one_error_line(runner.invoke(app, ["build-image", str(tmp_path / "nope"), "--tag", "a:1"]))
    assert "does not exist" in line
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    line = one_error_line(runner.invoke(app, ["build-image", str(tmp_path), "--tag", "a:1"]))
    assert "has no *.safetensors weights" in line


def test_a_tag_without_version_is_one_line():
    assert "NAME:VERSION" in one_error_line(runner.invoke(app, ["build-image", "--tag", "llmctl-ref"]))


def test_no_engine_is_one_line(tmp_path):
    pytest.importorskip("docker", reason="pip install 'llmctl[image]'")
    host = f"unix://{tmp_path}/no-engine.sock"
    line = one_error_line(runner.invoke(app, ["build-image", "--tag", "a:1"], env={"DOCKER_HOST": host}))
    assert f"no Docker engine reachable at {host}" in line


def test_a_base_missing_locally_is_one_line(monkeypatch):
    docker = pytest.importorskip("docker", reason="pip install 'llmctl[image]'")

    class Images:
        def get(self, name):
            raise docker.errors.ImageNotFound(f"No such image: {name}")

    client = type("Client", (), {"images": Images()})()
    monkeypatch.setattr("llmctl.dockerfiles.engine.connect", lambda: client)
    line = one_error_line(runner.invoke(app, ["build-image", "--tag", "a:1", "--base", "debian:12"]))
    assert "base image debian:12 is not in the engine's local images: `docker pull debian:12` first" in line


def test_context_only_needs_no_engine(tmp_path, no_pip):
    result = runner.invoke(app, ["build-image", "--tag", "llmctl-ref:0.1.0", "--base", "local/base:1",
                                 "--python-version", "3.11", "--context-only", str(tmp_path / "ctx"),
                                 "--k8s", str(tmp_path / "k8s"), "--gpus", "0"],
                           env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert result.exit_code == 0, result.output
    dockerfile = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert dockerfile.count("FROM local/base:1 AS runtime") == 1
    assert (tmp_path / "ctx" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == [
        "deployment.yaml", "hpa.yaml", "inferenceservice.yaml", "kustomization.yaml", "networkpolicy.yaml",
        "prometheus-adapter-rules.yaml", "service.yaml", "servicemonitor.yaml"]
    assert no_pip.bases[0].python == "3.11" and not no_pip.bases[0].install_python


def test_kernel_configs_are_baked_in_and_named_where_the_runtime_looks(tmp_path, no_pip):
    from llmctl.runtime.kernels.w4a16 import Config, configs

    tuned = tmp_path / "h200.json"
    configs.write_tuned(tuned, "NVIDIA H200", {"4096x4096:g128:seq:float16:m1": Config("gemv", 1, 64, 128, 4)})
    args = ["build-image", "--tag", "llmctl-ref:0.1.0", "--context-only", str(tmp_path / "ctx"),
            "--kernel-configs", str(tuned)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    dockerfile = (tmp_path / "ctx" / "Dockerfile").read_text()
    assert "ENV LLMCTL_W4A16_CONFIGS=/opt/llmctl-kernel-configs" in dockerfile
    assert "COPY kernel-configs/ /opt/llmctl-kernel-configs/" in dockerfile
    assert 'io.llmctl.kernel-configs="NVIDIA H200"' in dockerfile
    assert configs.read_tuned(tmp_path / "ctx" / "kernel-configs" / "0-h200.json")[0] == "NVIDIA H200"
    stale = tmp_path / "old.json"
    stale.write_text(tuned.read_text().replace(f'"kernels_version": {configs.KERNELS_VERSION}', '"kernels_version": 1'))
    assert "version 1" in one_error_line(runner.invoke(app, [*args[:-1], str(stale)]))
    (tmp_path / "not.json").write_text("{}")
    assert "not.json is not a W4A16 tuned file" in one_error_line(runner.invoke(app, [*args[:-1], str(tmp_path / "not.json")]))
    plain = runner.invoke(app, args[:-2] + ["--context-only", str(tmp_path / "plain")])
    assert "LLMCTL_W4A16_CONFIGS" not in (tmp_path / "plain" / "Dockerfile").read_text()
    assert plain.exit_code == 0 and not (tmp_path / "plain" / "kernel-configs").exists()


def test_context_only_defaults_to_the_cuda_base(tmp_path, no_pip):
    result = runner.invoke(app, ["build-image", "--tag", "llmctl-ref:0.1.0", "--context-only", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS runtime" in (tmp_path / "Dockerfile").read_text()
    assert no_pip.bases[0].python == "3.12" and no_pip.bases[0].install_python


def test_the_wheels_cuda_must_match_a_cuda_base_and_names_the_driver(tmp_path, no_pip, monkeypatch):
    """The default image once put a CUDA 13 torch on a CUDA 12.8 base: it started, then failed on drivers
    new enough for the base but not for torch."""
    fake = no_pip

    def with_cuda(dest: Path, base, constraints=None, on_progress=None):
        names = fake(dest, base, constraints)
        (dest / "nvidia_cuda_runtime-13.0.96-py3-none-manylinux_2_27_x86_64.whl").write_bytes(b"")
        return names

    monkeypatch.setattr("llmctl.dockerfiles.wheelhouse.build_wheelhouse", with_cuda)
    ok = runner.invoke(app, ["build-image", "--tag", "m:1", "--context-only", str(tmp_path / "ok")],
                       env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert "the image needs NVIDIA driver >= 580.65.06 (CUDA 13.0)" in ok.output
    dockerfile = (tmp_path / "ok" / "Dockerfile").read_text()
    assert 'io.llmctl.cuda="13.0"' in dockerfile and "NVIDIA driver >= 580.65.06" in dockerfile
    old = runner.invoke(app, ["build-image", "--tag", "m:1", "--base", "nvidia/cuda:12.8.1-runtime-ubuntu24.04",
                              "--python-version", "3.12", "--context-only", str(tmp_path / "old")])
    assert old.exit_code == 1 and " ".join(old.stderr.split()) == (
        "error: the base nvidia/cuda:12.8.1-runtime-ubuntu24.04 is CUDA 12.8 but the wheels' torch runs on CUDA "
        "13.0: use --base nvidia/cuda:13.0.1-runtime-ubuntu24.04, or constrain torch to a CUDA 12.8 build "
        "(-c constraints.txt)")


@pytest.mark.parametrize("wheel,cuda", [
    ("nvidia_cuda_runtime-13.0.96-py3-none-manylinux_2_27_x86_64.whl", "13.0"),
    ("nvidia_cuda_runtime_cu12-12.8.90-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "12.8"),
    ("torch-2.9.1+cu128-cp312-cp312-manylinux_2_28_x86_64.whl", "12.8"),
    ("torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl", None),
])
def test_wheels_cuda_reads_the_runtime_wheel_or_torchs_tag(tmp_path, wheel, cuda):
    from llmctl.dockerfiles.cuda import check_base, wheels_cuda

    (tmp_path / wheel).write_bytes(b"")
    assert wheels_cuda(tmp_path) == cuda
    check_base("debian:12", cuda)  # not a CUDA base: nothing to agree with
    check_base(f"nvidia/cuda:{cuda}.1-runtime-ubuntu24.04", cuda)


def test_output_json_is_the_image_and_files_as_one_document(tmp_path, no_pip):
    import json

    result = runner.invoke(app, ["build-image", "--tag", "m:1", "--base", "debian:12-slim", "--context-only",
                                 str(tmp_path / "ctx"), "--k8s", str(tmp_path / "k8s"), "--output", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout: no spinner, no "wrote" lines
    assert doc["tag"] == "m:1" and doc["context"] == str(tmp_path / "ctx") and doc["cuda"] is None
    assert doc["requires"] == "no GPU driver (a CPU build of torch)" and len(doc["model_sha256"]) == 64
    assert str(tmp_path / "k8s" / "kustomization.yaml") in doc["k8s"]
    assert no_pip.bases[-1].glibc == "2.36"  # debian 12's, so wheels built for newer glibc than 2.28 are found
