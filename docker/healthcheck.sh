#!/bin/sh
# Docker HEALTHCHECK for both images: healthy only if the server says ready AND every ready model
# answers a real inference (zeros, batch 1, binary tensors). A server whose model worker died
# still answers /v2/health/ready on a stock Triton; the inference does not.
# python3 with the standard library only: both base images have it, neither is guaranteed curl.
set -eu
exec python3 - "http://127.0.0.1:${COLLN_HTTP_PORT:-8000}" <<'PY'
import json
import sys
import urllib.request

SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "FP16": 2, "BF16": 2, "INT16": 2, "UINT16": 2,
         "FP32": 4, "INT32": 4, "UINT32": 4, "FP64": 8, "INT64": 8, "UINT64": 8}
url = sys.argv[1]


def call(path, body=None, headers=None):
    request = urllib.request.Request(url + path, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=4) as answer:
        return answer.read()


try:
    call("/v2/health/ready")
    models = [m["name"] for m in json.loads(call("/v2/repository/index", b"{}")) if m.get("state") == "READY"]
    if not models:
        sys.exit("no model is ready")
    for name in models:
        config = json.loads(call(f"/v2/models/{name}/config"))
        inputs, data = [], b""
        for tensor in config["input"]:
            datatype = tensor["data_type"].removeprefix("TYPE_")
            shape = ([1] if config.get("max_batch_size", 0) else []) + [int(d) for d in tensor["dims"]]
            size = SIZES[datatype]
            for d in shape:
                size *= d
            inputs.append({"name": tensor["name"], "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}})
            data += bytes(size)
        header = json.dumps({"inputs": inputs}).encode()
        call(f"/v2/models/{name}/infer", header + data, {"Inference-Header-Content-Length": str(len(header))})
except Exception as exc:  # any failure is "unhealthy": say which in docker inspect's log
    sys.exit(f"unhealthy: {exc}")
PY
