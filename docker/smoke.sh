#!/bin/sh
# Smoke test of the CPU image, the way a user meets it: build it, run it, wait until Docker says
# healthy, send a correct request and compare the logits with ONNX Runtime's on the image's own
# model.onnx, send malformed requests and expect a 400 for each while the server stays ready, then
# stop the container and expect a clean exit. All traffic stays on 127.0.0.1.
#
#   docker/smoke.sh [docker build options...]
#   e.g. docker/smoke.sh --build-arg PIP_INDEX_URL=https://mirror.example/simple
#
# Environment:
#   IMAGE       image tag (default colln-serve-cpu)
#   SKIP_BUILD  1: use the existing IMAGE, do not build
#   PORT        first of the three host ports, HTTP; gRPC and metrics are PORT+1, PORT+2 (default 18000)
#   NETWORK     host: run with --network host, serving on 127.0.0.1 (for a daemon without a bridge);
#               default: publish the ports on 127.0.0.1 only
#   PYTHON      a Python with numpy and onnxruntime (default python3): computes the reference
# Needs docker. Prints one line per step with its time; exit 0 only if every check passed.
set -eu

image=${IMAGE:-colln-serve-cpu}
port=${PORT:-18000}
python=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
name=colln-smoke-$$
work=$(mktemp -d)
url=http://127.0.0.1:$port

say() { echo "smoke: $*"; }
fail() {
    say "FAILED: $*"
    docker logs --tail 40 "$name" 2>&1 | sed 's/^/  container: /' || true
    exit 1
}
cleanup() {
    docker rm -f "$name" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    began=$(now)
    docker build -f "$root/docker/Dockerfile.cpu" -t "$image" "$@" "$root" > "$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log"; fail "docker build (log above)"; }
    say "built $image in $(since "$began") s"
fi
export_dir=$(docker inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed -n 's/^COLLN_EXPORT=//p')
[ -n "$export_dir" ] || fail "$image sets no COLLN_EXPORT"
model=$(basename "$export_dir")
say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.2f GB", $1 / 1e9 }'), serves $model"

if [ "${NETWORK:-}" = host ]; then
    network="--network host -e COLLN_HOST=127.0.0.1 -e COLLN_HTTP_PORT=$port -e COLLN_GRPC_PORT=$((port + 1)) -e COLLN_METRICS_PORT=$((port + 2))"
else
    network="-p 127.0.0.1:$port:8000 -p 127.0.0.1:$((port + 1)):8001 -p 127.0.0.1:$((port + 2)):8002"
fi
began=$(now)
# shellcheck disable=SC2086  # $network is a list of options
docker run -d --name "$name" --shm-size=256m $network "$image" > /dev/null
status=starting
while [ "$status" != healthy ]; do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$name" 2> /dev/null) || fail "the container is gone"
    [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || fail "the container exited while starting"
    [ "$status" != unhealthy ] || fail "Docker marked it unhealthy"
    awk -v s="$(since "$began")" 'BEGIN { exit !(s > 300) }' && fail "not healthy after 300 s"
    sleep 1
done
say "healthy after $(since "$began") s"
# The HEALTHCHECK's own command, timed inside the container (Docker gives it 5 s).
probe=$(docker exec "$name" python3 -c "
import subprocess, time
t = time.perf_counter()
subprocess.run(['/opt/colln/bin/healthcheck.sh'], check=True)
print(f'{time.perf_counter() - t:.2f}')") || fail "the healthcheck fails in a healthy container"
say "healthcheck (python3 -m colln.serve.health) answered in $probe s"

docker cp -q "$name:$export_dir/model.onnx" "$work/model.onnx"
"$python" - "$url" "$model" "$work/model.onnx" << 'PY' || fail "requests (see above)"
import json
import sys
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort

url, model, onnx_path = sys.argv[1:]


def call(path, body=None, headers=None):
    headers = dict(headers or {})
    if body is not None:
        binary = "Inference-Header-Content-Length" in headers
        headers.setdefault("Content-Type", "application/octet-stream" if binary else "application/json")
    request = urllib.request.Request(url + path, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


config = json.loads(call(f"/v2/models/{model}/config")[1])
dims = [int(d) for d in config["input"][0]["dims"]]
max_batch = int(config["max_batch_size"])
images = np.random.default_rng(0).standard_normal((4, *dims)).astype(np.float32)
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
expected = session.run(["logits"], {"images": images})[0]


def json_body(shape, data=None, datatype="FP32", name="images"):
    data = [0.0] * int(np.prod(shape)) if data is None else data
    return json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}).encode()


def binary_body(array, declared=None):
    header = json.dumps(
        {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(array.shape), "parameters": {"binary_data_size": declared or array.nbytes}}]}
    ).encode()
    return header + array.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def infer_logits(batch):
    status, body = call(f"/v2/models/{model}/infer", json_body(list(batch.shape), batch.ravel().tolist()))
    assert status == 200, (status, body[:300])
    output = next(o for o in json.loads(body)["outputs"] if o["name"] == "logits")
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


served = infer_logits(images)
error = float(np.abs(served - expected).max())
np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
print(f"smoke: correct request: logits {list(served.shape)} match ONNX Runtime (max |diff| {error:.1e})")

one = np.zeros((1, *dims), np.float32)
nan = np.full((1, *dims), np.nan, np.float32)
malformed = {
    "invalid JSON": (b"not json at all", {}),
    "wrong inner shape": (json_body([1, dims[0], dims[1], dims[2] - 1]), {}),
    "wrong datatype": (json_body([1, *dims], datatype="FP64"), {}),
    "unknown input": (json_body([1, *dims], name="pixels"), {}),
    "batch above the maximum": (json_body([max_batch + 1, *dims]), {}),
    "huge declared shape, little data": (json_body([100000, 3, 224, 224], [0.0]), {}),
    "data shorter than the shape": (json_body([1, *dims], [1.0, 2.0]), {}),
    "binary size mismatch": binary_body(one, declared=one.nbytes - 4),
    "binary header length beyond the body": (binary_body(one)[0], {"Inference-Header-Content-Length": str(10**9)}),
    "NaN pixels": binary_body(nan),
}
for what, (body, headers) in malformed.items():
    status, answer = call(f"/v2/models/{model}/infer", body, headers)
    assert status == 400, f"{what}: {status} {answer[:200]!r}"
    assert call("/v2/health/ready")[0] == 200, f"not ready after: {what}"
print(f"smoke: {len(malformed)} malformed requests: 400 each, ready after each")
np.testing.assert_allclose(infer_logits(images), expected, rtol=1e-4, atol=1e-5)
print("smoke: a correct request after them: same logits")
PY

began=$(now)
docker stop -t 30 "$name" > /dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "exit code $code after docker stop"
docker logs "$name" 2>&1 | grep -q "colln-serve: stopped" || fail "no 'colln-serve: stopped' in the log"
say "stopped in $(since "$began") s, exit 0"
say "passed"
