"""The image's HEALTHCHECK: GET /health on the server's own port (HTTPS when the server has a certificate),
with the Python the image already has.

Minimal bases have no curl or wget, and a shell one-liner would hide a 503 behind a traceback; this exits
0 only for 200 and says why otherwise, which `docker inspect` shows under State.Health.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def main() -> int:
    port = os.environ.get("LLMCTL_PORT", "8000")
    tls = bool(os.environ.get("LLMCTL_SSL_CERTFILE"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    # The server's certificate names its public host, not 127.0.0.1: this local probe checks liveness, not identity.
    context = ssl._create_unverified_context() if tls else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
