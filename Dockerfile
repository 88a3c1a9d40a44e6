# SAT on a GPU server: NVIDIA's Triton container, plus the satseg package that the python models of the
# model repository import, plus an entrypoint that starts tritonserver with the production flags.
# The image holds no model repository, no key and no certificate (deploy/README.md).
#
#   docker build -t sat-triton:0.1.0 .
#   docker run -d --gpus '"device=0"' --shm-size=4g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#       -v /srv/sat/repository:/models:ro -e SAT_ADMIN_KEY_FILE=/run/secrets/sat-admin-key \
#       -v /etc/sat/admin-key:/run/secrets/sat-admin-key:ro sat-triton:0.1.0
#
# Needs BuildKit (Docker 23 or later): the entrypoint below is written with a heredoc.

# TRITON_TAG must be the release export/Dockerfile uses, where sat-export --tensorrt builds the plans: a
# TensorRT plan loads only in the TensorRT version it was built with. Each plan's manifest.json records that
# version ("tensorrt"); NVIDIA's release notes of a tag list its TensorRT, CUDA and Python versions
# (25.01: TensorRT 10.8, CUDA 12.8, Python 3.12 on Ubuntu 24.04). To move to another release, change the
# tag here and in export/Dockerfile together, rebuild both images and rebuild the plans on the target GPU.
ARG TRITON_TAG=25.01-py3
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}

# The segmenter stitches windows in torch on the GPU, so torch must be a CUDA build the container's driver
# setup can run: CUDA 12 for releases up to 25.07 (PyTorch's cu12x index), CUDA 13 from 25.08 on (PyPI's
# default torch wheels are CUDA 13 builds and need an R580 driver).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# satseg's own dependencies are what the GPU configs need (TensorRT runs the networks; numpy stays below 2,
# see pyproject.toml). The cpu extra (onnxruntime, small) lets the same image serve configs/cpu.pbtxt
# (SAT_MODEL_CONFIG=cpu). Not the serve extra: its nvidia-pytriton wheel carries a second tritonserver.
# Not the gpu extra: onnxruntime-gpu runs no model of the served configs.
COPY pyproject.toml README.md /tmp/satseg-src/
# One distribution: every package folder pyproject.toml lists must be there to build it.
COPY satseg /tmp/satseg-src/satseg
COPY training /tmp/satseg-src/training
COPY export /tmp/satseg-src/export
COPY clients /tmp/satseg-src/clients
COPY loadtest /tmp/satseg-src/loadtest
RUN export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    && python3 -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python3 -m pip install --no-cache-dir "/tmp/satseg-src[cpu]" \
    && rm -rf /tmp/satseg-src \
    && python3 -c "import numpy, onnxruntime, satseg.triton_models.segmenter, satseg.triton_models.prompt_encoder; \
assert numpy.__version__.startswith('1.'), numpy.__version__" \
    && mkdir -p /models

# The entrypoint: refuses to start without an admin key, then execs tritonserver with strict readiness, no
# model control, no auto-completed configs and the admin endpoints behind the sat-admin-key header (the same
# flags as satseg/server/triton.py). Arguments given to `docker run IMAGE ...` are appended (TLS, logging).
COPY --chmod=0755 <<'EOF' /usr/local/bin/sat-triton
#!/bin/sh
set -eu
if [ -n "${SAT_ADMIN_KEY_FILE:-}" ]; then
    SAT_ADMIN_KEY=$(cat "$SAT_ADMIN_KEY_FILE")
fi
key="${SAT_ADMIN_KEY:-}"
unset SAT_ADMIN_KEY SAT_ADMIN_KEY_FILE
case "$key" in
    "")
        echo "sat-triton: no admin key; set SAT_ADMIN_KEY_FILE (or SAT_ADMIN_KEY) to e.g. \$(openssl rand -hex 32)" >&2
        exit 64 ;;
    *[!A-Za-z0-9._-]*)
        echo "sat-triton: the admin key may hold only letters, digits, '.', '_' and '-' (openssl rand -hex 32)" >&2
        exit 64 ;;
esac
if [ "${#key}" -lt 32 ]; then
    echo "sat-triton: the admin key is shorter than 32 characters (openssl rand -hex 32)" >&2
    exit 64
fi
apis=model-repository,model-config,shared-memory,statistics,trace,logging
config=""
if [ -n "${SAT_MODEL_CONFIG:-}" ]; then
    config="--model-config-name=${SAT_MODEL_CONFIG}"
fi
exec tritonserver \
    --model-repository="${SAT_MODEL_REPOSITORY:-/models}" \
    --strict-readiness=true \
    --model-control-mode=none \
    --disable-auto-complete-config \
    --exit-timeout-secs="${SAT_EXIT_TIMEOUT_S:-120}" \
    --http-restricted-api="${apis}:sat-admin-key=${key}" \
    --grpc-restricted-protocol="${apis}:sat-admin-key=${key}" \
    ${config:+"$config"} \
    "$@"
EOF

# No network at run time (the tokenizer and the query table come from the repository); HOME and the
# matplotlib cache in /tmp because NVIDIA's triton-server user has no home directory.
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1

LABEL org.opencontainers.image.title="sat-triton" \
      org.opencontainers.image.description="SAT text-prompted 3D segmentation on NVIDIA Triton. Research use only, not for clinical use." \
      org.opencontainers.image.licenses="Apache-2.0"

# uid/gid 1000 is NVIDIA's triton-server user of the base image (numeric, so runAsNonRoot can check it).
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000 8001 8002

# Healthy means one tiny real inference was answered: /v2/models/sat/ready keeps answering 200 after a python
# stub died (Triton never restarts it), only a request that reaches the stubs fails. A refusal by a full queue
# counts as alive. The first load (TensorRT plans, python stubs) takes minutes. With SAT_MODEL_CONFIG=cpu one
# window takes minutes: run that smoke test with --no-healthcheck (deploy/README.md, Probes).
HEALTHCHECK --interval=30s --timeout=30s --start-period=300s --retries=3 \
    CMD ["python3", "-m", "satseg.cli.serve", "--check", "http://127.0.0.1:8000", "--check-timeout", "25"]

# NVIDIA's entrypoint first: it sets up CUDA forward compatibility on older data-centre drivers.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/usr/local/bin/sat-triton"]
CMD []
