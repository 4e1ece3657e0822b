# The ebrflow image: the trainer (`ebrflow run`) and the replay producer (`ebrflow replay`).
#
#   docker build -t ebrflow .                                  # CPU torch 2.13.0
#   docker build --build-arg TORCH_SPEC='torch>=2.2' -t ebrflow .
#
# torch is installed first, from the CPU wheel index, so `pip install ".[train]"` (the trainer's extra) finds it
# satisfied and never pulls a multi-GB CUDA build from the default index.
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /app
# Only what the package needs (no .venv, data or caches in the image). README* may be absent.
COPY pyproject.toml README* ./
COPY ebrflow ./ebrflow
COPY stream ./stream
COPY model ./model
COPY indexer ./indexer
COPY ops ./ops
RUN pip install ".[train]" && rm -rf /app/build

# Unprivileged user; /var/lib/ebrflow is the run.data_dir volume (checkpoints, id tables, history).
RUN useradd --system --uid 10001 --home-dir /var/lib/ebrflow --create-home ebrflow \
    && mkdir -p /etc/ebrflow
USER ebrflow
WORKDIR /var/lib/ebrflow

EXPOSE 9464
CMD ["ebrflow", "run", "--config", "/etc/ebrflow/ebrflow.toml"]
