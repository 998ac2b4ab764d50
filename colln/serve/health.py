"""``python -m colln.serve.health [URL]``: the Docker images' HEALTHCHECK. Healthy (exit 0) only if
the server says ready and every ready model answers the same probe inference the supervisor sends
(:func:`colln.serve.guard.probe_request`): a server whose model worker died still answers
``/v2/health/ready`` on a stock Triton; the inference does not."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Sequence

from colln.serve.guard import ModelLimits, probe_request

TIMEOUT_S = 4.0


def _call(
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
        return answer.read()


def unhealthy(
    url: str,
) -> str | None:
    """None if the server at ``url`` is ready and every ready model answers a probe, else what failed."""
    try:
        _call(f"{url}/v2/health/ready")
        index = json.loads(_call(f"{url}/v2/repository/index", b"{}"))
        models = [m["name"] for m in index if m.get("state") == "READY"]
        if not models:
            return "no model is ready"
        for name in models:
            body, headers = probe_request(ModelLimits.from_config(json.loads(_call(f"{url}/v2/models/{name}/config"))))
            _call(f"{url}/v2/models/{name}/infer", body, headers)
    except Exception as exc:  # noqa: BLE001  (any failure is "unhealthy": say which in docker inspect's log)
        return f"unhealthy: {exc}"
    return None


def main(
    argv: Sequence[str] | None = None,
) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    url = args[0] if args else f"http://127.0.0.1:{os.environ.get('COLLN_HTTP_PORT', '8000')}"
    problem = unhealthy(url)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
