"""A throwaway dockerd for the end-to-end test, and the debootstrap base it builds on.

The engine gets its own data root, exec root, socket and pid file under one temp dir, no bridge and no
iptables (nothing it runs needs a network), and is stopped by its PID. The base is Debian bookworm's
minbase with python3 (3.11, like the host), made once with debootstrap and kept as a tarball at a path
(LLMCTL_TEST_BASE_CACHE), so that reruns import it in seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BASE_TAG = "llmctl-test-base:bookworm"
BASE_CACHE = Path(os.environ.get("LLMCTL_TEST_BASE_CACHE",
                                 Path.home() / ".cache" / "llmctl" / "test-base-bookworm-python3.tar"))
MIRROR = os.environ.get("LLMCTL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30


def missing_requirements() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if shutil.which("dockerd") is None:
        return "dockerd is missing (apt-get install docker.io)"
    if not BASE_CACHE.is_file() and shutil.which("debootstrap") is None:
        return f"debootstrap is missing (apt-get install debootstrap) and no base is cached at {BASE_CACHE}"
    return None


class Engine:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="llmctl-dockerd-"))  # short: a socket path has 107 bytes
        self.host = f"unix://{self.root}/docker.sock"
        self.process: subprocess.Popen | None = None  # kept: a dropped Popen gets reaped behind our back

    def start(self) -> None:
        with (self.root / "dockerd.log").open("wb") as log:
            process = self.process = subprocess.Popen(
                ["dockerd", "--storage-driver=overlay2", "--iptables=false", "--ip6tables=false", "--bridge=none",
                 f"--data-root={self.root}/data", f"--exec-root={self.root}/exec", f"--host={self.host}",
                 f"--pidfile={self.root}/docker.pid"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {process.returncode}: {self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer in {START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to our dockerd (it stops its containers and its containerd), SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # its PID, not a name: other engines may be running
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False)  # rmtree: minutes

    def import_base(self) -> None:
        if not BASE_CACHE.is_file():
            make_base_tarball(BASE_CACHE)
        name, tag = BASE_TAG.split(":")
        self.client().api.import_image_from_file(str(BASE_CACHE), repository=name, tag=tag)

    def log_tail(self) -> str:
        return (self.root / "dockerd.log").read_text(errors="replace")[-2000:]

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.host, timeout=600)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # the socket is not there yet, or not listening yet
            return False


def make_base_tarball(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmctl-debootstrap-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(rootfs), MIRROR],
                       check=True, capture_output=True)
        partial = dest.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.replace(dest)
