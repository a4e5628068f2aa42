# Mirrors README.md's set-up: install histmol at the tested versions (constraints.txt), then
# build the demo corpus. Everything histmol writes goes under /data: mount a host folder there.
#   docker build -t histmol .
#   docker run --rm -v "$PWD/out:/data" histmol                    # histmol demo --out /data/demo
#   docker run --rm -v "$PWD/out:/data" histmol inspect demo/corpus
FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /opt/histmol
COPY pyproject.toml README.md constraints.txt ./
COPY histmol ./histmol
COPY platform_adapters ./platform_adapters
COPY flows ./flows
COPY manifests ./manifests
# torch's CPU wheel first (PyPI's Linux wheel is a multi-GB CUDA build), then histmol with
# every dependency pinned by constraints.txt (regenerate: python tools/freeze_constraints.py)
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt .
WORKDIR /data
VOLUME /data
ENTRYPOINT ["histmol"]
CMD ["demo", "--out", "/data/demo"]
