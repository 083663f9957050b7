# One image for the three services, the migration and the CLI: `docker build -t followups .`
# Built from the repository root; runs as an unprivileged user; no compilers in the final image.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: a code change doesn't reinstall them. The runtime lock
# only (requirements.lock; the tests' tools are in requirements-dev.lock), every file checked
# against its hash.
COPY pyproject.toml requirements.lock ./
RUN pip install --require-hashes --requirement requirements.lock
COPY README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps . \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim
RUN groupadd --system --gid 10001 followups \
    && useradd --system --uid 10001 --gid followups --no-create-home --shell /usr/sbin/nologin followups
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["followups"]
CMD ["--help"]
