# The DLSR Monitor app image: one image for the monitor, trainer, dashboard and demo producer (see
# docker-compose.yml). CPU by default; the GPU variant runs the same image with a device reservation.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first: the largest layer changes least often.
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
RUN pip install ${TORCH_PINS}

COPY pyproject.toml README.md ./
COPY config ./config
COPY dlsr ./dlsr
COPY common ./common
COPY monitor ./monitor
COPY trainer ./trainer
COPY console ./console
COPY demo ./demo
COPY bench ./bench
COPY cli ./cli
RUN pip install .

RUN useradd --system --uid 10001 --home-dir /var/lib/dlsr dlsr \
    && mkdir -p /var/lib/dlsr/artifacts /var/lib/dlsr/cache \
    && chown -R dlsr /var/lib/dlsr
USER dlsr
WORKDIR /var/lib/dlsr

# The package installs as `dlsr` + `dlsr_monitor.*`; /app on the path keeps the short container entry points
# `python -m monitor` and `python -m trainer` working (this image holds no other project's modules).
ENV PYTHONPATH=/app \
    DLSR_MODEL__ARTIFACT_STORE=/var/lib/dlsr/artifacts \
    DLSR_MODEL__FEATURE_CACHE=/var/lib/dlsr/cache/features

CMD ["dlsr", "--help"]
