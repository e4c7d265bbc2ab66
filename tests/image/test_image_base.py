"""What the probe of a base image says, and which wheels the host fetches for it."""

from __future__ import annotations

import pytest

from llmctl.dockerfiles.base import DEFAULT_BASE, BaseImage, assumed_base, parse_probe
from llmctl.dockerfiles.wheelhouse import platforms


def test_a_base_with_python_is_used_as_it_is():
    base = parse_probe("debian:12", "arch=x86_64\nglibc=2.36\npython=3.11\n")
    assert base == BaseImage("debian:12", "3.11", glibc="2.36", arch="x86_64", install_python=False)


def test_a_known_base_without_python_gets_its_distributions():
    base = parse_probe(DEFAULT_BASE, "arch=x86_64\nglibc=2.39\nos=ubuntu-24.04\n")
    assert base.install_python and base.python == "3.12" and base.glibc == "2.39"
    assert assumed_base(DEFAULT_BASE, None) == base


@pytest.mark.parametrize("output, message", [
    ("arch=x86_64\nglibc=2.35\nos=fedora-40\n", "has no python3 and is fedora-40"),
    ("arch=x86_64\nglibc=\npython=3.12\n", "has no glibc"),
    ("arch=x86_64\nglibc=2.31\npython=3.8\n", "needs Python >= 3.10"),
])
def test_bases_that_cannot_run_llmctl_are_refused(output, message):
    with pytest.raises(ValueError, match=message):
        parse_probe("some/base:1", output)


def test_wheels_may_target_any_glibc_up_to_the_bases():
    tags = platforms("2.36", "x86_64")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags and "manylinux2014_x86_64" in tags


def test_a_wheelhouse_is_reused_only_for_the_base_it_was_made_for(tmp_path):
    import json

    from llmctl.dockerfiles.wheelhouse import WheelhouseError, reuse_wheelhouse

    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("llmctl-0.1.0-py3-none-any.whl", "pip-26.3-py3-none-any.whl", "torch-2.13.0-cp311.whl"):
        (cache / name).write_bytes(b"wheel")
    base = BaseImage("debian:12", "3.11", glibc="2.36")
    (cache / "wheelhouse.json").write_text(json.dumps(
        {"python": "3.11", "glibc": "2.36", "arch": "x86_64", "constraints": ""}))
    names = reuse_wheelhouse(cache, tmp_path / "ctx" / "wheels", base)
    assert names == ("llmctl-0.1.0-py3-none-any.whl", "pip-26.3-py3-none-any.whl")
    assert (tmp_path / "ctx" / "wheels" / "torch-2.13.0-cp311.whl").read_bytes() == b"wheel"
    with pytest.raises(WheelhouseError, match="made for another base"):
        reuse_wheelhouse(cache, tmp_path / "ctx2", BaseImage("ubuntu:24.04", "3.12", glibc="2.39"))


def test_pip_progress_streams_while_it_runs_and_errors_keep_pips_reason(tmp_path):
    """build-image's wheel fetch was a silent spinner for half a minute: pip's lines now reach a callback
    as they come, shortened to what is being resolved or downloaded."""
    from llmctl.dockerfiles import wheelhouse

    notes = []
    on_line = wheelhouse._progress_notes(notes.append)
    for line in ("Collecting torch==2.13.0\n", "  Downloading torch-2.13.0-cp312-manylinux_2_28_x86_64.whl (900.1 MB)\n",
                 "Collecting numpy\n", "  File was already downloaded /w/numpy-2.3.0.whl\n", "Saved ./x.whl\n"):
        on_line(line)
    assert notes == ["1 packages: resolving torch==2.13.0",
                     "1 packages: downloading torch-2.13.0-cp312-manylinux_2_28_x86_64.whl (900.1 MB)",
                     "2 packages: resolving numpy", "2 packages: file was already downloaded /w/numpy-2.3.0.whl"]
    lines = []
    wheelhouse._pip("--version", on_line=lines.append)
    assert lines and lines[0].startswith("pip ")
    with pytest.raises(wheelhouse.WheelhouseError, match="pip download failed: .*no-such-package-llmctl"):
        wheelhouse._pip("download", "--no-index", "--dest", str(tmp_path), "no-such-package-llmctl",
                        on_line=lines.append)
