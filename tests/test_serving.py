"""The served ``sat`` ensemble on the real ``tritonserver`` (pip, CPU) against the in-process reference.

One repository is exported from the bundled demo model and one server started for the session (conftest);
every request goes through raw ``tritonclient`` calls over loopback, so malformed requests can be sent too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from conftest import DEMO_CHECKPOINT
from scipy import ndimage
from served import MIN_AGREEMENT, agreement, phantom, reference_masks

from satseg import contract
from satseg.engine import LabelMapAccumulator
from satseg.geometry import Volume, load_nifti
from satseg.pipeline import Segmenter
from satseg.server.triton import TritonServer
from satseg_clients.sat_client import infer_inputs, request_arrays
from satseg_export.build_repo import ExportSettings, repository_is_current

pytest.importorskip("pytriton", reason="the serving tests need the serve extra (nvidia-pytriton)")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip

ABDOMEN = ["liver", "spleen", "kidney"]  # "kidney" is a parent: served as the union of its trained children


def client(triton_server: TritonServer, protocol: str) -> Any:
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(triton_server.grpc_url)
    return httpclient.InferenceServerClient(triton_server.http_url, network_timeout=600.0, connection_timeout=600.0)


def infer(
    connection: Any,
    volume: Volume,
    modality: str,
    prompts: list[str],
    parameters: dict[str, Any] | None = None,
    **overrides: np.ndarray,
) -> Any:
    """One ``sat`` request; ``overrides`` replace or add named input arrays (for malformed requests)."""
    module = grpcclient if isinstance(connection, grpcclient.InferenceServerClient) else httpclient
    arrays = request_arrays(volume.array, volume.affine, modality, prompts)
    arrays.update(overrides)
    inputs = infer_inputs(module, arrays)
    return connection.infer("sat", inputs, parameters=parameters)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_masks_equal_the_in_process_result(
    triton_server: TritonServer, demo_reference: Segmenter, protocol: str
) -> None:
    volume = phantom(seed=0)
    expected = reference_masks(demo_reference, volume, "ct", ABDOMEN)
    assert expected.any(), "the demo model finds nothing: the comparison would prove nothing"
    result = infer(client(triton_server, protocol), volume, "ct", ABDOMEN)
    masks = result.as_numpy(contract.MASKS)
    assert masks.dtype == np.uint8 and masks.shape == (len(ABDOMEN), *volume.shape)
    for index, prompt in enumerate(ABDOMEN):
        assert agreement(masks[index], expected[index]) >= MIN_AGREEMENT, prompt
    assert [label.decode() for label in result.as_numpy(contract.LABELS)] == ABDOMEN
    np.testing.assert_allclose(  # statistics' volumes are rounded to 0.001 mL
        result.as_numpy(contract.VOLUMES_ML),
        masks.reshape(len(ABDOMEN), -1).sum(axis=1) * volume.voxel_volume_ml,
        atol=5e-4,
    )
    assert result.as_numpy(contract.LABELMAP).size == 0


def test_labelmap_output_merges_like_the_in_process_writer(
    triton_server: TritonServer, demo_reference: Segmenter
) -> None:
    volume = phantom(seed=1, degrees=-10.0)
    terms = demo_reference.resolve_prompts(ABDOMEN)
    merged = LabelMapAccumulator(volume.shape)
    for value, item in enumerate(demo_reference.probabilities(volume, terms, "ct"), start=1):
        merged.add(value, item.probabilities)
    result = infer(client(triton_server, "grpc"), volume, "ct", ABDOMEN, parameters={"output": "labelmap"})
    labelmap = result.as_numpy(contract.LABELMAP)
    assert labelmap.dtype == np.uint16 and labelmap.shape == volume.shape
    assert set(np.unique(labelmap)) <= {0, 1, 2, 3}
    assert float((labelmap == merged.labelmap).mean()) >= MIN_AGREEMENT
    assert result.as_numpy(contract.MASKS).size == 0


def test_real_ct_and_lps_mr_come_back_on_their_own_grids(
    triton_server: TritonServer, demo_reference: Segmenter, shared_data: Path
) -> None:
    ct = load_nifti(shared_data / "totalseg" / "example_ct.nii.gz")
    ct = Volume(ct.array.astype(np.int16), ct.affine, "ct")
    mr = load_nifti(shared_data / "totalseg" / "example_mr_sm.nii.gz")
    assert nib.aff2axcodes(mr.affine) == ("L", "P", "S")
    mr = Volume(mr.array.astype(np.float32), mr.affine, "mri")
    for volume, modality, prompts, protocol in ((ct, "ct", ABDOMEN, "http"), (mr, "mri", ["liver", "spleen"], "grpc")):
        masks = infer(client(triton_server, protocol), volume, modality, prompts).as_numpy(contract.MASKS)
        # The grid is the input's own: same voxel order and shape; the affine stays with the client's copy.
        assert masks.shape == (len(prompts), *volume.shape)
        expected = reference_masks(demo_reference, volume, modality, prompts)
        assert expected.any()
        for index, prompt in enumerate(prompts):
            assert agreement(masks[index], expected[index]) >= MIN_AGREEMENT, (modality, prompt)
        # The liver is one connected body (the vocabulary says so): the served mask keeps its largest piece.
        assert ndimage.label(masks[prompts.index("liver")], structure=np.ones((3, 3, 3)))[1] == 1


@dataclass
class BadRequest:
    """One malformed request: what is wrong and the ``infer()`` arguments that carry it."""

    problem: str
    volume: Volume
    modality: str = "ct"
    prompts: list[str] = field(default_factory=lambda: ["liver"])
    parameters: dict[str, Any] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def bad_requests(volume: Volume) -> list[BadRequest]:
    """Each must come back INVALID_ARG."""
    singular = volume.affine.copy()
    singular[:3, 2] = singular[:3, 0]
    huge_spacing = volume.affine.copy()
    huge_spacing[:3, :3] *= 1000.0
    nan_image = volume.array.astype(np.float32)
    nan_image[0, 0, 0] = np.nan
    unit_range = np.random.default_rng(0).random(volume.shape, dtype=np.float32)
    return [
        BadRequest("NaN voxel", Volume(nan_image, volume.affine)),
        BadRequest("not Hounsfield units", Volume(unit_range, volume.affine)),
        BadRequest("singular affine", volume, extra={contract.AFFINE: singular}),
        BadRequest("absurd spacing", volume, extra={contract.AFFINE: huge_spacing}),
        BadRequest("unknown prompt", volume, prompts=["livr"]),
        BadRequest("too many prompts", volume, prompts=["liver"] * (contract.DEFAULT_MAX_PROMPTS + 1)),
        BadRequest("empty prompt", volume, prompts=[" "]),
        BadRequest("unknown modality", volume, modality="xray"),
        BadRequest("both images", volume, extra={contract.IMAGE: volume.array.astype(np.float32)}),
        BadRequest("threshold out of range", volume, parameters={"threshold": 2.0}),
        BadRequest("unknown option", volume, parameters={"tresh": 0.3}),
        BadRequest("2D image", Volume(volume.array[:, :, 0], volume.affine)),
        BadRequest("all-zero CT", Volume(np.zeros_like(volume.array), volume.affine)),
        BadRequest("blank item among prompts", volume, prompts=["liver", " "]),
        # Its error once echoed the prompt whole: past gRPC's 16 KB metadata limit, RESOURCE_EXHAUSTED.
        BadRequest("20,000-character prompt", volume, prompts=["liver" + "x" * 20_000]),
        BadRequest("escape characters", volume, prompts=["\x1b[31mlivr\x1b[0m"]),
    ]


def test_each_bad_input_gets_invalid_arg_and_the_server_stays_ready(triton_server: TritonServer) -> None:
    volume = phantom(seed=2, shape=(32, 28, 16))
    connection = client(triton_server, "grpc")
    for bad in bad_requests(volume):
        with pytest.raises(InferenceServerException) as caught:
            infer(connection, bad.volume, bad.modality, bad.prompts, bad.parameters, **bad.extra)
        assert "INVALID_ARG" in str(caught.value.status()), (bad.problem, caught.value.message())
        message = caught.value.message()
        assert len(message) < 400 and "\x1b" not in message and "\n" not in message, (bad.problem, message)
        assert triton_server.is_ready(), bad.problem
    good = infer(connection, volume, "ct", ["liver"]).as_numpy(contract.MASKS)
    assert good.shape == (1, *volume.shape)


def test_two_clients_at_once_each_get_their_own_result(triton_server: TritonServer, demo_reference: Segmenter) -> None:
    volumes = [phantom(seed=3, shape=(40, 36, 20)), phantom(seed=4, shape=(44, 32, 22), degrees=-20.0)]
    results: dict[int, np.ndarray] = {}

    def send(index: int) -> None:
        results[index] = infer(client(triton_server, "http"), volumes[index], "ct", ["liver"]).as_numpy(contract.MASKS)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, volume in enumerate(volumes):
        expected = reference_masks(demo_reference, volume, "ct", ["liver"])
        assert results[index].shape == (1, *volume.shape)
        assert agreement(results[index][0], expected[0]) >= MIN_AGREEMENT


def test_prompts_are_independent_of_their_neighbours(triton_server: TritonServer) -> None:
    volume = phantom(seed=5, shape=(32, 28, 16))
    connection = client(triton_server, "grpc")
    alone = infer(connection, volume, "ct", ["spleen"]).as_numpy(contract.MASKS)[0]
    together = infer(connection, volume, "ct", ["liver", "spleen"]).as_numpy(contract.MASKS)[1]
    np.testing.assert_array_equal(alone, together)


def test_the_served_repository_is_current_only_for_its_own_weights(
    triton_server: TritonServer, tiny_checkpoint: Path
) -> None:
    served = ExportSettings(checkpoint=DEMO_CHECKPOINT, repository=triton_server.repository)
    assert repository_is_current(served)
    assert not repository_is_current(replace(served, checkpoint=tiny_checkpoint))
    assert not repository_is_current(replace(served, tensorrt=True))  # no plans in it


def test_prompts_naming_one_term_share_one_mask_and_labels_say_which(triton_server: TritonServer) -> None:
    """MASKS has one mask per distinct term; LABELS is the mapping (the contract said one per prompt)."""
    volume = phantom(seed=4, shape=(32, 28, 16))
    result = infer(client(triton_server, "grpc"), volume, "ct", ["kidney_left", "liver", "left kidney"])
    assert [label.decode() for label in result.as_numpy(contract.LABELS)] == ["left kidney", "liver"]
    assert result.as_numpy(contract.MASKS).shape == (2, *volume.shape)
