"""HTTPS end to end: a CA, a server certificate for 127.0.0.1 and a client certificate made with openssl; the
openai SDK over TLS, and mutual TLS refusing a client without a certificate."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem; server.pem / server.key (SAN 127.0.0.1, signed by the CA); client.pem / client.key."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=llmctl test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *(["-extfile", "san.ext"] if name == "server" else []), cwd=d)
    return d


def https(running) -> str:
    return running.url.replace("http://", "https://")


def test_the_sdk_over_https_and_plain_http_refused(engine, serve, pki):
    with serve(engine, ssl_certfile=str(pki / "server.pem"), ssl_keyfile=str(pki / "server.key")) as r:
        client = openai.OpenAI(base_url=f"{https(r)}/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(pki / "ca.pem"))))
        out = client.completions.create(model="tiny", prompt="import os", max_tokens=4, temperature=0.0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
        assert httpx.get(f"{https(r)}/health", verify=ssl.create_default_context(cafile=str(pki / "ca.pem"))).status_code == 200
        with pytest.raises(httpx.HTTPError):  # the port speaks TLS only
            httpx.get(f"{r.url}/health", timeout=5)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # an unknown CA is not trusted
            httpx.get(f"{https(r)}/health", timeout=5)


def test_the_image_healthcheck_speaks_https_when_the_server_does(engine, serve, pki, monkeypatch, capsys):
    from llmctl.dockerfiles import healthcheck

    with serve(engine, ssl_certfile=str(pki / "server.pem"), ssl_keyfile=str(pki / "server.key")) as r:
        monkeypatch.setenv("LLMCTL_PORT", r.url.rsplit(":", 1)[1])
        monkeypatch.setenv("LLMCTL_SSL_CERTFILE", str(pki / "server.pem"))
        assert healthcheck.main() == 0 and "https://127.0.0.1" in capsys.readouterr().out
        monkeypatch.delenv("LLMCTL_SSL_CERTFILE")
        assert healthcheck.main() == 1  # plain HTTP to a TLS port: unhealthy, with the reason


def test_mutual_tls_requires_a_client_certificate(engine, serve, pki):
    ca = str(pki / "ca.pem")
    with serve(engine, ssl_certfile=str(pki / "server.pem"), ssl_keyfile=str(pki / "server.key"), ssl_ca_certs=ca,
               client_certs="required") as r:
        trusting = ssl.create_default_context(cafile=ca)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{https(r)}/health", verify=trusting, timeout=5)
        with_cert = ssl.create_default_context(cafile=ca)
        with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert httpx.get(f"{https(r)}/health", verify=with_cert, timeout=5).status_code == 200


def test_tls_settings_errors_name_the_flag(pki):
    from llmctl.runtime.server.settings import ServerSettings

    with pytest.raises(ValueError, match="--ssl-certfile: no such file"):
        ServerSettings("m", ssl_certfile=str(pki / "missing.pem"))
    with pytest.raises(ValueError, match="need --ssl-certfile"):
        ServerSettings("m", ssl_keyfile=str(pki / "server.key"))
    with pytest.raises(ValueError, match="--client-certs required needs --ssl-ca-certs"):
        ServerSettings("m", ssl_certfile=str(pki / "server.pem"), client_certs="required")
    with pytest.raises(ValueError, match="client_certs must be one of"):
        ServerSettings("m", ssl_certfile=str(pki / "server.pem"), client_certs="yes")
