# quantfarm: API and GPU workers in one CUDA image.
#   docker build -t quantfarm .
#   docker run --gpus all -p 8600:8600 -v qf:/data quantfarm            # API + one worker per GPU
#   docker run --gpus all -v qf:/data quantfarm worker --db postgresql://...   # workers only
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    QUANTFARM_HOME=/data HF_HOME=/data/hf VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY envs envs
COPY core core
COPY service service
COPY quantizers quantizers
COPY calibration calibration
COPY evaluation evaluation
# the CUDA build of torch at the locked version, then every other package from the lock (exact versions, hashes
# checked: the environment the tests passed in, Triton, Ray and s3fs included), then quantfarm itself
RUN pip install pip==26.3 && pip install -r envs/torch.txt && pip install --require-hashes -r envs/quantfarm.txt \
    && pip install --no-deps --no-build-isolation . && pip check

RUN useradd --create-home --uid 1000 quantfarm && mkdir -p /data && chown quantfarm /data
USER quantfarm
VOLUME /data
EXPOSE 8600
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8600/healthz || exit 1
ENTRYPOINT ["quantfarm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8600"]
