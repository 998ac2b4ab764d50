#!/bin/sh
# Docker HEALTHCHECK for both images: healthy once Triton reports ready (every model loaded).
# python3 rather than curl: both base images have it, neither is guaranteed to have curl.
set -eu
exec python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' \
    "http://127.0.0.1:${COLLN_HTTP_PORT:-8000}/v2/health/ready"
