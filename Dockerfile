# Mirrors README.md's set-up: install histmol, then build the demo corpus.
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /opt/histmol
COPY pyproject.toml README.md ./
COPY histmol ./histmol
COPY platform_adapters ./platform_adapters
COPY flows ./flows
COPY manifests ./manifests
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir .
WORKDIR /data
ENTRYPOINT ["histmol"]
CMD ["demo", "--out", "/data/demo"]
