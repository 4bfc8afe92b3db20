# syntax=docker/dockerfile:1
# Rotator: one image for every process (`rotator api`, `rotator worker`, `rotator beat`,
# `rotator db upgrade`, ...); docker-compose.yml picks the subcommand.

# --- build: install the project and its runtime dependencies into a virtualenv ---------------
FROM python:3.11-slim AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
COPY . .
# Runtime dependencies only: no `.[dev]` extras in the image.
RUN pip install --no-cache-dir .

# --- runtime: the virtualenv, a non-root user, nothing else ----------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH="/opt/venv/bin:$PATH"

RUN groupadd --system --gid 10001 rotator \
    && useradd --system --uid 10001 --gid rotator --home-dir /var/lib/rotator --create-home \
        --shell /usr/sbin/nologin rotator \
    && install -d -o rotator -g rotator /var/lib/rotator/metrics

COPY --from=build /opt/venv /opt/venv

# A writable working directory: `rotator beat` keeps its celerybeat-schedule file here, and
# metrics/ (a volume shared by the API and the workers) holds ROTATOR_METRICS_DIR.
WORKDIR /var/lib/rotator
USER 10001:10001

EXPOSE 8000
ENTRYPOINT ["rotator"]
CMD ["--help"]
