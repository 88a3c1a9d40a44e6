# The light image of the clients: sat-client (batch Jobs) and sat-dicom-node (the PACS bridge). No torch,
# no Triton: tritonclient, highdicom, pynetdicom, dicomweb-client and satseg's geometry and outputs.
#   docker build -f deploy/client.Dockerfile -t registry.example.org/sat/sat-client:0.1.0 .
FROM python:3.11-slim-bookworm
COPY pyproject.toml README.md /tmp/satseg-src/
# One distribution: every package folder pyproject.toml lists must be there to build it.
COPY satseg /tmp/satseg-src/satseg
COPY training /tmp/satseg-src/training
COPY export /tmp/satseg-src/export
COPY clients /tmp/satseg-src/clients
COPY loadtest /tmp/satseg-src/loadtest
RUN PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --no-cache-dir "/tmp/satseg-src[pacs]" \
    && rm -rf /tmp/satseg-src \
    && python3 -c "import satseg_clients.dicom_node.node, satseg_clients.cli; import sys; assert 'torch' not in sys.modules" \
    && useradd --uid 1000 --create-home sat
USER 1000
