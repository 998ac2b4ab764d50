#!/bin/sh
# Docker HEALTHCHECK for both images: healthy only if the server says ready AND every ready model
# answers a real inference, the same probe the supervisor sends (colln.serve.health).
exec python3 -m colln.serve.health "http://127.0.0.1:${COLLN_HTTP_PORT:-8000}"
