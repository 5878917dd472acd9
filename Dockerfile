# The dicom-transfer controller (and the compose stack's pacs-loader): see docker-compose.yml.
#   docker build -t dicom-transfer .
#   docker run --rm -e DICOM_TRANSFER_LOCAL_PASSWORD=... -v "$PWD/data:/data" dicom-transfer \
#       --batch /data/series.csv --config /data/transfer.yaml
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TCP_NODELAY=1

WORKDIR /app

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY main.py ./
COPY dicom_transfer/ ./dicom_transfer/
COPY conf/ ./conf/

# Non-root. /data (batch, journal, report) belongs to that user, so a named volume mounted
# there starts writable; a bind mount must be writable by uid 10001.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin transfer \
    && mkdir -p /data \
    && chown transfer:transfer /data
USER 10001:10001

ENTRYPOINT ["python", "main.py"]
CMD ["--help"]
