# GPU serving image: a colln export as a TensorRT plan on NVIDIA Triton's stock tensorrt backend.
#   docker build -t colln-triton-gpu .
#   docker run --gpus all -p 8000-8002:8000-8002 colln-triton-gpu
# Triton 24.10 = Triton 2.51 (the server PyTriton 0.7 bundles for colln-serve) with TensorRT 10.5.0.
# TENSORRT_VERSION must be that TensorRT: the entrypoint builds model.plan at container start, on
# the serving GPU, and refuses to start if the pip TensorRT differs from the image's libnvinfer.
# Package indexes are build arguments (pip reads them from the environment of the RUN):
#   PIP_INDEX_URL        first index; defaults to PyTorch's CPU wheel index (torch without CUDA)
#   PIP_EXTRA_INDEX_URL  also searched; defaults to PyPI (everything else)
#   NVIDIA_PIP_INDEX_URL also searched; defaults to NVIDIA's own index, for TensorRT's libraries
#                        (PyPI's tensorrt, tensorrt-cu12 and tensorrt-cu12-libs are source stubs
#                        that fetch from NVIDIA's index: here pip searches it itself, and the
#                        stubs' own nested pip is switched off, so every download is from these three)
#   e.g. docker build --build-arg PIP_INDEX_URL=<mirror of the CPU torch index> ...
# No constraints.txt here: it pins CPython 3.11 wheels (onnxruntime 1.32, scikit-image 0.26, ...)
# and this image's Python is 3.10, so pip resolves the pyproject ranges for it.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

ARG PIP_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=https://pypi.org/simple
ARG NVIDIA_PIP_INDEX_URL=https://pypi.nvidia.com
ARG TENSORRT_VERSION=10.5.0
ARG MODEL=digits_vit
ARG KEEP=0.7
# The served model's name: the export directory's name (default colln-export's own name for it).
ARG NAME=${MODEL}-colln-keep${KEEP}
ENV COLLN_EXPORT=/opt/colln/exports/${NAME} \
    COLLN_REPO=/opt/colln/models \
    COLLN_BACKEND=tensorrt \
    COLLN_MAX_BATCH=32 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/colln/src
COPY pyproject.toml README.md ./
COPY colln ./colln
# CPU PyTorch: torch is only needed to export the ONNX graph here; TensorRT runs the model.
# The export happens at build time (no GPU needed); the engine build cannot.
RUN PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL} ${NVIDIA_PIP_INDEX_URL}" NVIDIA_TENSORRT_DISABLE_INTERNAL_PIP=1 \
    python3 -m pip install --no-cache-dir \
        "colln[cpu,trt,guard] @ file:///opt/colln/src" "tensorrt==${TENSORRT_VERSION}" \
    && colln-export "${MODEL}" --keep "${KEEP}" --out "${COLLN_EXPORT}"

COPY docker/entrypoint-gpu.sh docker/healthcheck.sh /opt/colln/bin/
RUN useradd --create-home --uid 10001 colln \
    && mkdir -p "${COLLN_REPO}" \
    && chown -R colln "${COLLN_REPO}" "${COLLN_EXPORT}"
USER 10001
WORKDIR /home/colln

EXPOSE 8000 8001 8002
# start-period covers the engine build on first start (minutes for a ViT-B, seconds for digits_vit).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["/opt/colln/bin/healthcheck.sh"]
ENTRYPOINT ["/opt/colln/bin/entrypoint-gpu.sh"]
