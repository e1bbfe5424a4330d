# cachesaver-dist: one image for the cache workers, batch workers and the LLM simulator.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged runtime user (no login shell, no password).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app

WORKDIR /src
# hatchling needs the sources to build, so the metadata cannot be copied on its own first;
# copy only what the wheel needs so edits elsewhere (tests, docs, ops) keep the cache.
COPY pyproject.toml README.md ./
COPY cachesaver_dist/ cachesaver_dist/
COPY workers/ workers/
RUN pip install . && rm -rf /src

USER app
WORKDIR /home/app
CMD ["cachesaver-dist", "--help"]
