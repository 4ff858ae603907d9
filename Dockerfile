# echo-at-time container image: one image for every process.
#   docker build -t echo-at-time .
#   docker run --rm -p 8080:8080 -e EAT_REDIS_URL=redis://redis:6379/0 -e EAT_ZK_HOSTS=zk:2181 echo-at-time
#   docker run --rm echo-at-time worker --concurrency 16
# Not exercised by the test suite (no Docker engine there); tests/unit/test_deploy_files.py
# checks that it names only subcommands, flags and EAT_* settings that exist.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: install the package and its dependencies into a virtualenv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every dependency (hiredis, msgspec, uvloop, httptools) ships manylinux wheels,
# so the builder needs no compiler either.
COPY pyproject.toml README.md ./
COPY app ./app
COPY election ./election
COPY workers ./workers
# A regular (non-editable) install; pip byte-compiles, so the read-only root
# filesystem at run time never needs a .pyc written.
RUN pip install --upgrade pip setuptools wheel && pip install . && \
    echo-at-time --help >/dev/null

# ---- final: the venv on a clean slim base, run as an unprivileged user ----
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EAT_LOG_FORMAT=json
RUN groupadd --system --gid 10001 eat && \
    useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin eat
COPY --from=builder /opt/venv /opt/venv
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["echo-at-time"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]
