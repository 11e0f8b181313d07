"""Transfer syntax preference in association negotiation, and the C-STORE size limit applied while
the object arrives, over real associations with `lvpnet-archive serve`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE

from service.dicom.handlers import preferred_transfer_syntaxes
from tests.archive_support import c_store, ct_dataset, received_size, start_serve

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
PRIVATE = "1.2.826.0.1.3680043.9.9999.1"  # a private storage SOP class pynetdicom does not know
UNKNOWN_SYNTAX = UID("1.2.3.4.5.6.7.8.9")


def test_preference_rule() -> None:
    assert preferred_transfer_syntaxes([ImplicitVRLittleEndian, ExplicitVRLittleEndian]) == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    # Only Explicit moves: Big Endian offered first stays first
    assert preferred_transfer_syntaxes([ExplicitVRBigEndian, ImplicitVRLittleEndian, ExplicitVRLittleEndian]) == [
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    # Compressed keeps the sender's place, first or not
    assert preferred_transfer_syntaxes([JPEGLSLossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian])[0] == (
        JPEGLSLossless
    )
    assert preferred_transfer_syntaxes([ImplicitVRLittleEndian, RLELossless, ExplicitVRLittleEndian]) == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        RLELossless,
    ]
    # A syntax nobody knows is dropped while a known one remains
    assert preferred_transfer_syntaxes([UNKNOWN_SYNTAX, ImplicitVRLittleEndian]) == [ImplicitVRLittleEndian]
    assert preferred_transfer_syntaxes([UNKNOWN_SYNTAX]) == [UNKNOWN_SYNTAX]


def test_negotiation_prefers_explicit_and_takes_compressed_as_offered(tmp_path: Path, sqlite_url: str) -> None:
    archive = start_serve(tmp_path, sqlite_url, embedded_workers=0)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        # An SCU that offers Implicit first, as some modalities do
        ae.add_requested_context(CT, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        ae.add_requested_context(MR, [JPEG2000Lossless, ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        ae.add_requested_context(US, [ImplicitVRLittleEndian, ExplicitVRBigEndian])
        ae.add_requested_context(PRIVATE, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE")
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax): cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
            assert accepted == {
                CT: ExplicitVRLittleEndian,
                MR: JPEG2000Lossless,
                US: ImplicitVRLittleEndian,  # no Explicit LE offered: the sender's first
                PRIVATE: ExplicitVRLittleEndian,
            }
            ds = ct_dataset(seed=40)
            assert assoc.send_c_store(ds).Status == 0x0000
            private = ct_dataset(seed=41)
            private.SOPClassUID = private.file_meta.MediaStorageSOPClassUID = PRIVATE
            assert assoc.send_c_store(private).Status == 0x0000
        finally:
            assoc.release()
        for uid in (ds.SOPInstanceUID, private.SOPInstanceUID):
            assert [v["transfer_syntax_uid"] for v in archive.instance(uid)] == [ExplicitVRLittleEndian]
    finally:
        archive.stop()


def _fixed_length_uids(n: int) -> dict[str, str]:
    root = "1.2.826.0.1.3680043.10.1408"  # any valid root; the suffixes keep every length equal
    return {part: f"{root}.{k}.{n:06d}" for k, part in enumerate(("study_uid", "series_uid", "sop_uid"), start=1)}


def test_c_store_over_the_limit_is_refused_while_it_arrives(tmp_path: Path, sqlite_url: str) -> None:
    # UIDs of one fixed length (generate_uid's vary), so the two sizes differ only by the description
    under = ct_dataset(seed=50, **_fixed_length_uids(50))
    under.SeriesDescription = "x" * 8  # 2 bytes shorter than `over`: sizes are even
    over = ct_dataset(seed=51, **_fixed_length_uids(51))
    over.SeriesDescription = "x" * 10
    size = received_size(over)
    assert received_size(under) == size - 2
    limit = size - 1  # `over` is the limit + 1, `under` the limit - 1
    archive = start_serve(tmp_path, sqlite_url, max_instance_bytes=limit, embedded_workers=0)
    try:
        assert c_store(archive.dicom_port, [under]) == [0x0000]
        assert archive.instance(under.SOPInstanceUID)[0]["original_bytes"] == size - 2

        large = ct_dataset(rows=1024, cols=1024, seed=52)
        large.PixelData = np.random.default_rng(52).integers(0, 4096, (1024, 1024), dtype=np.uint16).tobytes()
        large_size = received_size(large)
        # Refused, and the association still serves the next one
        assert c_store(archive.dicom_port, [over, large, under]) == [0xA700, 0xA700, 0x0000]
        assert archive.instance(over.SOPInstanceUID) == []
        assert archive.instance(large.SOPInstanceUID) == []

        refusals = [
            entry
            for entry in map(json.loads, filter(lambda line: line.startswith("{"), archive.log().splitlines()))
            if entry["msg"] == "instance refused"
        ]
        # The 2 MiB object was cut off at the limit: counted to the end, never written whole
        cut = [entry for entry in refusals if entry["bytes"] == large_size]
        assert len(cut) == 1 and cut[0]["spooled"] <= limit
        assert not list((archive.data_dir / "incoming").iterdir())
    finally:
        archive.stop()
