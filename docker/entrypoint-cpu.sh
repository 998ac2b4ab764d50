#!/bin/sh
# CPU image: serve the baked-in export with colln-serve (PyTriton's Triton, ONNX Runtime inside),
# as a model named after the export directory (the image's build arg NAME).
# exec: colln-serve becomes the container's main process, so docker stop's SIGTERM reaches it.
set -eu
exec colln-serve "${COLLN_EXPORT:?the export directory to serve}" \
    --host "${COLLN_HOST:-0.0.0.0}" \
    --http-port "${COLLN_HTTP_PORT:-8000}" \
    --grpc-port "${COLLN_GRPC_PORT:-8001}" \
    --metrics-port "${COLLN_METRICS_PORT:-8002}" \
    --max-batch "${COLLN_MAX_BATCH:-32}" \
    --instances "${COLLN_INSTANCES:-1}" \
    "$@"
