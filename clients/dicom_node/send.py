"""Sending a result back: C-STORE to a DICOM AE (pynetdicom) or STOW-RS to a DICOMweb server (dicomweb-client).

A destination that cannot be reached raises :class:`DestinationUnreachable` (the job waits, uncounted); one
that answers and refuses raises :class:`DestinationRefused` (the job's attempt counts).
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from satseg_clients.dicom_node.config import Send

SUCCESS_OR_WARNING = frozenset({0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})
"""C-STORE statuses that mean the destination holds the instance (PS3.4 GG.4, PS3.7 C)."""


class DestinationUnreachable(ConnectionError):
    """The destination did not accept an association or a connection."""


class DestinationRefused(RuntimeError):
    """The destination answered and did not store the result; the message says how it answered."""


def send_result(path: Path, destination: Send, calling_ae_title: str) -> None:
    """Store the DICOM file at ``path`` at ``destination`` (over DIMSE as ``calling_ae_title``)."""
    if destination.kind == "dimse":
        c_store(path, destination, calling_ae_title)
    else:
        stow(path, destination)


def c_store(path: Path, destination: Send, calling_ae_title: str) -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID)  # a SEG or an RTSTRUCT
    tls = None
    if destination.tls is not None:
        import ssl

        tls = (destination.tls.context(ssl.Purpose.SERVER_AUTH), destination.host)
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not association.is_established:
        raise DestinationUnreachable(
            f"no association with {destination.ae_title} at {destination.host}:{destination.port}"
        )
    try:
        status = association.send_c_store(path)
    finally:
        association.release()
    code = int(status.get("Status", -1)) if status else -1
    if code not in SUCCESS_OR_WARNING:
        if code == -1:
            raise DestinationUnreachable(f"{destination.ae_title} gave no C-STORE response")
        raise DestinationRefused(f"{destination.ae_title} answered C-STORE with status 0x{code:04X}")


def stow(path: Path, destination: Send) -> None:
    import requests

    from satseg_clients.dicom_node.receive import dicomweb_client

    assert destination.dicomweb is not None  # the config's check
    client = dicomweb_client(destination.dicomweb)
    try:
        client.store_instances([pydicom.dcmread(path)])
    except requests.ConnectionError as error:
        raise DestinationUnreachable(f"STOW-RS to {destination.dicomweb.url} failed: {type(error).__name__}") from None
    except requests.HTTPError as error:
        raise DestinationRefused(f"STOW-RS answered {error.response.status_code}") from None
