# The light image of the clients: sat-client (batch Jobs) and sat-dicom-node (the PACS bridge). No torch,
# no Triton: tritonclient, highdicom, pynetdicom, dicomweb-client and satseg's geometry and outputs.
#   docker build -f deploy/client.Dockerfile -t registry.example.org/sat/sat-client:0.1.0 .
FROM python:3.11-slim-bookworm
COPY pyproject.toml README.md /tmp/satseg-src/
COPY satseg /tmp/satseg-src/satseg
COPY clients /tmp/satseg-src/clients
RUN PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-cache-dir "/tmp/satseg-src[pacs]" \
    && rm -rf /tmp/satseg-src \
    && python3 -c "import clients.dicom_node.node, clients.cli; import sys; assert 'torch' not in sys.modules" \
    && useradd --uid 1000 --create-home sat
USER 1000
