"""System shared memory for a server on this host: the image and the masks skip the socket entirely.

One region per request holds the image, then the masks and the label map; it is registered with the
server (an admin endpoint: it needs the admin key), used, unregistered and destroyed, so concurrent
requests never share a region and nothing outlives the request.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from satseg import contract

OUTPUT_DTYPES = {contract.MASKS: np.uint8, contract.LABELMAP: np.uint16}
RELEASE_WAIT_S = 10.0
"""How long an unregister waits for the server to let go of a region its answered request still held."""
IN_USE = "currently in use"


@dataclass(frozen=True)
class Placement:
    """Where one tensor sits in the region."""

    offset: int
    byte_size: int
    shape: tuple[int, ...]
    dtype: Any


def placements(image: np.ndarray, prompts: int, output: str) -> dict[str, Placement]:
    """The image first, then the outputs the request asks for (``output``: masks, labelmap or both)."""
    shape = tuple(image.shape)
    wanted = {
        contract.MASKS: ((prompts, *shape), output != contract.OUTPUT_LABELMAP),
        contract.LABELMAP: (shape, output != contract.OUTPUT_MASKS),
    }
    layout = {"image": Placement(0, image.nbytes, shape, image.dtype)}
    offset = image.nbytes
    for name, (tensor_shape, asked) in wanted.items():
        if asked:
            size = int(np.prod(tensor_shape)) * np.dtype(OUTPUT_DTYPES[name]).itemsize
            layout[name] = Placement(offset, size, tensor_shape, OUTPUT_DTYPES[name])
            offset += size
    return layout


@contextmanager
def request_region(
    connection: Any, image: np.ndarray, layout: dict[str, Placement], headers: dict[str, str]
) -> Iterator[tuple[str, Any]]:
    """A registered region holding ``image``; yields its name and handle, then unregisters and destroys it."""
    import tritonclient.utils.shared_memory as system_shm

    name = f"sat-{uuid.uuid4().hex}"
    size = sum(placement.byte_size for placement in layout.values())
    handle = system_shm.create_shared_memory_region(name, f"/{name}", size)
    try:
        system_shm.set_shared_memory_region(handle, [np.ascontiguousarray(image)])
        connection.register_system_shared_memory(name, f"/{name}", size, headers=headers)
        try:
            yield name, handle
        finally:
            unregister_when_released(connection, name, headers)
    finally:
        system_shm.destroy_shared_memory_region(handle)


def unregister_when_released(connection: Any, name: str, headers: dict[str, str]) -> None:
    """Unregister region ``name``. Triton lets go of a region a request used only after it has sent the answer,
    so an unregister right after the answer can find it "currently in use" (seen on a loaded 2-core host):
    that one refusal is retried, with growing pauses, for up to :data:`RELEASE_WAIT_S`."""
    deadline, pause = time.monotonic() + RELEASE_WAIT_S, 0.01
    while True:
        try:
            connection.unregister_system_shared_memory(name, headers=headers)
            return
        except Exception as error:  # tritonclient's InferenceServerException, over gRPC or HTTP
            if IN_USE not in str(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


def read_output(handle: Any, placement: Placement) -> np.ndarray:
    """A copy of one output from the region (the region is destroyed after the request)."""
    import tritonclient.utils.shared_memory as system_shm

    contents = system_shm.get_contents_as_numpy(handle, placement.dtype, placement.shape, offset=placement.offset)
    return np.array(contents)
