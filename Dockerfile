# ShizhenGPT server image for a RunPod load-balancing serverless endpoint (README: "Serverless").
# The transformers engine (ENGINE=auto finds no vLLM here); Dockerfile.vllm is the same server on vLLM.
# The base image brings CUDA and torch; requirements.txt accepts that torch, so pip installs only the rest.
# The server downloads MODEL_ID into HF_HOME at its first start and finds it there afterwards.
#   docker build --platform linux/amd64 -t you/shizhengpt-server:1 .   (on a machine with Docker; see README)
ARG BASE_IMAGE=runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The balancer sends requests to PORT and polls GET /ping on PORT_HEALTH (200 ready, 204 loading).
# A network volume is mounted at /runpod-volume: the model cache lives there, so a new worker does not
# download 64 GB again. Every other setting of .env.example can be set on the endpoint.
# WARMUP=1: one short generation (with an image) runs before /ping says 200, so the first request the
# balancer routes here does not pay for first-use compilation and allocation.
# ALLOWED_HOSTS=*: a worker is reached only through RunPod's balancer (which checks the RunPod key first),
# under host names RunPod chooses; no browser shares its network, so there is no DNS-rebinding page to stop.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    PORT_HEALTH=8000 \
    HF_HOME=/runpod-volume/models \
    MODEL_ID=FreedomIntelligence/ShizhenGPT-32B-VL \
    LOG_FORMAT=json \
    WARMUP=1 \
    ALLOWED_HOSTS=*

WORKDIR /app
# requirements.txt starts with `-r requirements-server.txt`: both are needed for the install.
COPY requirements-server.txt requirements.txt ./
RUN python3.11 -m pip install --no-cache-dir -r requirements.txt \
    && python3.11 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
COPY backend ./backend

EXPOSE 8000
# Generous start period: the first worker on an empty volume downloads the model before /ping says 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=40m \
    CMD ["/bin/bash", "-c", "curl -fsS \"http://127.0.0.1:${PORT_HEALTH:-$PORT}/ping\" || exit 1"]
CMD ["python3.11", "-m", "backend"]
