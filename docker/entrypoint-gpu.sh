#!/bin/sh
# GPU image: build model.plan on this GPU with the image's TensorRT version (plans only load on
# the TensorRT version and GPU that built them), write the Triton model repository, and serve it
# with the image's tritonserver behind colln-serve's guard and supervisor.
# COLLN_BACKEND=onnxruntime serves model.onnx with Triton's onnxruntime backend on the GPU instead (no build).
# The model is named after the export directory (the image's build arg NAME), as in the CPU image.
set -eu
export_dir=${COLLN_EXPORT:?the export directory to serve}
repo=${COLLN_REPO:-/opt/colln/models}
backend=${COLLN_BACKEND:-tensorrt}
max_batch=${COLLN_MAX_BATCH:-32}

if [ "$backend" = tensorrt ]; then
    # The pip TensorRT that builds the plan must be the libnvinfer that Triton's backend loads.
    python3 - <<'PY'
import ctypes
import sys
from importlib import metadata

try:
    wheel = metadata.version("tensorrt")
except metadata.PackageNotFoundError:
    sys.exit("colln: error: entrypoint: full TensorRT is not installed: pip install tensorrt==<the image's TensorRT version>")
try:
    code = ctypes.CDLL("libnvinfer.so." + wheel.split(".")[0]).getInferLibVersion()
except OSError:
    sys.exit("colln: error: entrypoint: no libnvinfer in this image: run on nvcr.io/nvidia/tritonserver")
image = f"{code // 10000}.{code // 100 % 100}.{code % 100}"
if not (wheel + ".").startswith(image + "."):
    sys.exit(f"colln: error: entrypoint: pip TensorRT {wheel} differs from the image's {image}: rebuild with --build-arg TENSORRT_VERSION={image}")
PY
    if [ ! -f "$export_dir/model.plan" ]; then
        colln-build "$export_dir" --batch-min 1 --batch-opt $((max_batch < 8 ? max_batch : 8)) --batch-max "$max_batch"
    fi
fi
# ONNX Runtime on this image's GPU: the plain model.onnx (the fused model.ort.onnx is ONNX Runtime's CPU flavour).
device=
if [ "$backend" = onnxruntime ]; then
    device=cuda
fi
colln-triton "$export_dir" "$repo" --backend "$backend" --max-batch "$max_batch" ${device:+--device "$device"}
# colln-serve in front: its guard checks every request before Triton allocates for it (Triton's own
# HTTP JSON parsing reserves the declared shape first), its supervisor restarts Triton when it or a
# probe inference fails. Triton itself listens on private loopback ports only.
exec colln-serve --repository "$repo" --tritonserver "${TRITONSERVER:-tritonserver}" \
    --host "${COLLN_HOST:-0.0.0.0}" \
    --http-port "${COLLN_HTTP_PORT:-8000}" \
    --grpc-port "${COLLN_GRPC_PORT:-8001}" \
    --metrics-port "${COLLN_METRICS_PORT:-8002}" \
    "$@"
