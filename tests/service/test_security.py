"""Security through a real `serve`: API keys and roles on every route (401 vs 403), the dashboard
session cookie, the audit trail for every store/query/retrieve path, calling-AE allow-lists,
refusing to expose '*' or no-auth beyond loopback, DICOM TLS (mutual) and HTTPS, and deletion."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.archive_support import (
    ArchiveProcess,
    c_store,
    ct_dataset,
    database,
    free_port,
    part10_bytes,
    start_serve,
    stow,
)

ADMIN_PASSWORD = "correct horse battery staple"
ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def create_key(archive: ArchiveProcess, role: str, name: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--role", role, "--name", name],
        env=archive.env,
        capture_output=True,
        text=True,
        check=True,
    )
    key = completed.stdout.strip()
    assert key.startswith("lvpa_")
    return key


class Secured:
    def __init__(self, archive: ArchiveProcess, keys: dict[str, str], study: Dataset, scp_port: int) -> None:
        self.archive, self.keys, self.ds, self.scp_port = archive, keys, study, scp_port
        self.received: list[str] = []

    def headers(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"} if role else {}

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.archive.http}/admin/api/audit", params={"limit": "1000", **filters}, headers=self.headers("admin")
        )
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("security")
    received: list[str] = []
    store_scp = AE(ae_title="DEST")
    store_scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    scp_port = free_port()
    server = store_scp.start_server(
        ("127.0.0.1", scp_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(e.request.AffectedSOPInstanceUID) or 0)],
    )
    with database("sqlite", tmp) as url:
        archive = start_serve(
            tmp,
            url,
            require_auth="true",
            admin_password=ADMIN_PASSWORD,
            dicom_allowed_aes="STORER,TESTSCU",
            dicom_qr_allowed_aes="QUERIER,GETTER@127.0.0.1",
            dicom_peers=f"DEST=127.0.0.1:{scp_port}",
        )
        try:
            keys = {role: create_key(archive, role, f"{role}-key") for role in ("reader", "uploader", "admin")}
            archive.headers = {"Authorization": f"Bearer {keys['admin']}"}
            ds = ct_dataset(rows=48, cols=48, seed=77)
            assert c_store(archive.dicom_port, [ds], calling_ae="STORER") == [0]
            archive.wait_state(ds.SOPInstanceUID, {"archived"})
            secured = Secured(archive, keys, ds, scp_port)
            secured.received = received
            yield secured
        finally:
            archive.stop()
            server.shutdown()


def _routes(s: Secured) -> list[tuple[str, str, set[str]]]:
    ds = s.ds
    instance = f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    return [
        ("GET", "/dicomweb/studies", {"reader", "admin"}),
        ("GET", f"/dicomweb/studies/{ds.StudyInstanceUID}/series", {"reader", "admin"}),
        ("GET", instance, {"reader", "admin"}),
        ("GET", instance + "/metadata", {"reader", "admin"}),
        ("GET", instance + "/frames/1", {"reader", "admin"}),
        ("POST", "/dicomweb/studies", {"uploader", "admin"}),
        ("GET", "/stats", {"admin"}),
        ("GET", f"/instances/{ds.SOPInstanceUID}", {"admin"}),
        ("GET", "/admin/api/savings", {"admin"}),
        ("GET", "/admin/api/health", {"admin"}),
        ("GET", "/admin/api/studies", {"admin"}),
        ("GET", "/admin/api/audit", {"admin"}),
        ("GET", "/admin/api/audit.csv", {"admin"}),
        ("GET", "/admin/api/keys", {"admin"}),
        ("GET", "/metrics", {"reader", "uploader", "admin"}),
    ]


def test_role_matrix(secured: Secured) -> None:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10_bytes(ct_dataset(seed=78)) + b"\r\n--b--\r\n"
    for method, path, allowed in _routes(secured):
        for role in (None, "bogus", "reader", "uploader", "admin"):
            headers = {"Authorization": "Bearer lvpa_not-a-key"} if role == "bogus" else secured.headers(role)
            if method == "POST":
                headers["Content-Type"] = 'multipart/related; type="application/dicom"; boundary=b'
            response = httpx.request(method, secured.archive.http + path, headers=headers, content=body, timeout=60)
            if role in (None, "bogus"):
                expected = {401}
            elif role in allowed:
                expected = {200}
            else:
                expected = {403}
            assert response.status_code in expected, (method, path, role, response.status_code, response.text[:200])
            if response.status_code == 401:
                assert response.headers["www-authenticate"].startswith("Bearer")
    for open_path in ("/healthz", "/readyz"):
        assert httpx.get(secured.archive.http + open_path).status_code == 200
    # A key revoked is a key refused
    revoked = create_key(secured.archive, "reader", "short-lived")
    assert (
        httpx.get(
            f"{secured.archive.http}/dicomweb/studies", headers={"Authorization": f"Bearer {revoked}"}
        ).status_code
        == 200
    )
    assert (
        httpx.delete(f"{secured.archive.http}/admin/api/keys/short-lived", headers=secured.headers("admin")).status_code
        == 200
    )
    assert (
        httpx.get(
            f"{secured.archive.http}/dicomweb/studies", headers={"Authorization": f"Bearer {revoked}"}
        ).status_code
        == 401
    )


def test_dashboard_session(secured: Secured) -> None:
    http = secured.archive.http
    with httpx.Client(base_url=http, follow_redirects=False) as client:
        assert client.get("/admin").status_code == 303  # to the login page
        refused = client.post("/admin/login", data={"secret": "wrong"})
        assert refused.status_code == 303 and "error" in refused.headers["location"]
        assert (
            client.post("/admin/login", data={"secret": secured.keys["reader"]}).headers["location"].endswith("error=1")
        )  # a reader key is not an admin
        ok = client.post("/admin/login", data={"secret": ADMIN_PASSWORD})
        assert ok.status_code == 303 and ok.headers["location"] == "/admin"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert client.get("/admin").status_code == 200
        # The figures are stale-while-revalidate (served up to a few seconds old, the start-up value
        # included): the cookie reaches them, and they catch up with the archived instance.
        deadline = time.monotonic() + 30
        while (savings := client.get("/admin/api/savings")).json()["instances"] < 1 and time.monotonic() < deadline:
            assert savings.status_code == 200 and "age_seconds" in savings.json()
            time.sleep(0.5)
        assert savings.json()["instances"] >= 1
        # State changes with the cookie need the header a cross-site form cannot send
        assert client.post("/admin/api/keys", json={"name": "x", "role": "reader"}).status_code == 403
        created = client.post(
            "/admin/api/keys",
            json={"name": "via-dashboard", "role": "reader"},
            headers={"X-Requested-With": "lvpnet-archive"},
        )
        assert created.status_code == 201 and created.json()["key"].startswith("lvpa_")
    logins = secured.audit(action="login")
    assert {e["outcome"] for e in logins} >= {"ok", "refused"}


def test_audit_every_path(secured: Secured) -> None:
    s, ds = secured, secured.ds
    http = s.archive.http
    # STOW and C-STORE were audited as stores
    stowed = ct_dataset(rows=32, cols=32, seed=79, study_uid=ds.StudyInstanceUID)
    assert stow(http, [part10_bytes(stowed)]).status_code == 401  # no key
    response = httpx.post(
        f"{http}/dicomweb/studies",
        content=b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10_bytes(stowed) + b"\r\n--b--\r\n",
        headers={**s.headers("uploader"), "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    assert response.status_code == 200
    stores = s.audit(action="store")
    assert any(
        e["actor"] == "STORER" and e["interface"] == "c-store" and e["sop_instance_uid"] == ds.SOPInstanceUID
        for e in stores
    )
    assert any(e["actor"] == "uploader-key" and e["interface"] == "stow" for e in stores)
    # QIDO and WADO
    httpx.get(f"{http}/dicomweb/studies", params={"PatientID": "TEST*"}, headers=s.headers("reader")).raise_for_status()
    url = f"{http}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    httpx.get(url, headers={**s.headers("reader"), "Accept": ANY}, timeout=60).raise_for_status()
    # C-FIND, C-MOVE, C-GET from allowed AEs
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    finder = AE(ae_title="QUERIER")
    finder.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    finder.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = finder.associate("127.0.0.1", s.archive.dicom_port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    assert [r[0].Status for r in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)][-1] == 0
    moved = list(assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    assert moved[-1][0].Status == 0 and ds.SOPInstanceUID in s.received
    getter = AE(ae_title="GETTER")
    getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    getter.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = getter.associate(
        "127.0.0.1",
        s.archive.dicom_port,
        ae_title="LVPARCHIVE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)],
    )
    assert assoc.is_established
    got = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert got[-1][0].Status == 0 and got[-1][0].NumberOfCompletedSuboperations >= 1

    retrievals = s.audit(action="retrieve", study=ds.StudyInstanceUID)
    by_interface = {(e["interface"], e["actor"]) for e in retrievals if e["sop_instance_uid"] == ds.SOPInstanceUID}
    assert {("wado", "reader-key"), ("c-move", "QUERIER"), ("c-get", "GETTER")} <= by_interface
    queries = s.audit(action="query")
    assert any(e["interface"] == "qido" and e["actor"] == "reader-key" for e in queries)
    assert any(e["interface"] == "c-find" and e["actor"] == "QUERIER" for e in queries)
    csv_text = httpx.get(f"{http}/admin/api/audit.csv", headers=s.headers("admin")).text
    assert csv_text.splitlines()[0].startswith("at,actor,actor_kind,action") and "c-move" in csv_text
    # Patient data stays out of the log
    log = s.archive.log()
    assert "Doe^Jane" not in log and "TEST-PATIENT" not in log


def test_calling_ae_allow_lists(secured: Secured) -> None:
    port = secured.archive.dicom_port
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assoc = stranger.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    assert assoc.is_rejected
    # A storer may not query: its C-FIND context is refused, its storage context accepted
    storer = AE(ae_title="STORER")
    storer.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    storer.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = storer.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {CTImageStorage}
    # A querier may not store
    querier = AE(ae_title="QUERIER")
    querier.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    querier.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = querier.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {StudyRootQueryRetrieveInformationModelFind}
    # GETTER is allowed from 127.0.0.1 only: the entry names the host
    refused = secured.audit(action="associate")
    assert any(e["actor"] == "STRANGER" and e["outcome"] == "refused" for e in refused)


def test_refuses_to_expose_any_ae_or_no_auth(tmp_path: Path) -> None:
    env_base = {"ARCHIVE_DATA_DIR": str(tmp_path / "var"), "ARCHIVE_HOST": "0.0.0.0"}

    for extra, message in (
        ({"ARCHIVE_REQUIRE_AUTH": "true"}, "ARCHIVE_DICOM_ALLOWED_AES"),
        (
            {
                "ARCHIVE_REQUIRE_AUTH": "false",
                "ARCHIVE_DICOM_ALLOWED_AES": "PACS",
                "ARCHIVE_DICOM_QR_ALLOWED_AES": "PACS",
            },
            "REQUIRE_AUTH",
        ),
    ):
        completed = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve"],
            env={**os.environ, **env_base, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 2 and message in completed.stderr, completed.stderr


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: Any, cert: Any) -> None:
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_key, ca)

    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(stem))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if stem == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))
    return {stem: folder / f"{stem}.pem" for stem in ("ca", "server", "client")}


def test_dicom_mutual_tls_and_https(tmp_path: Path) -> None:
    certs = _certificates(tmp_path)
    with database("sqlite", tmp_path) as url:
        archive = start_serve(
            tmp_path,
            url,
            dicom_tls_cert=certs["server"],
            dicom_tls_key=tmp_path / "server.key",
            dicom_tls_ca=certs["ca"],
            http_tls_cert=certs["server"],
            http_tls_key=tmp_path / "server.key",
            scheme="https",
        )
        try:
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca"]))
            client.load_cert_chain(str(certs["client"]), str(tmp_path / "client.key"))
            ae = AE(ae_title="TLSSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE", tls_args=(client, "127.0.0.1"))
            assert assoc.is_established and assoc.send_c_echo().Status == 0
            assoc.release()
            # Without a client certificate the handshake fails: no association
            anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca"]))
            assoc = ae.associate(
                "127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE", tls_args=(anonymous, "127.0.0.1")
            )
            assert not assoc.is_established
            # Plain DICOM on the TLS port: no association either
            assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE")
            assert not assoc.is_established
            https = httpx.get(
                f"https://127.0.0.1:{archive.http_port}/healthz",
                verify=ssl.create_default_context(cafile=str(certs["ca"])),
            )
            assert https.status_code == 200
        finally:
            archive.stop()


def test_delete_study_leaves_tombstone_and_frees_objects(secured: Secured) -> None:
    s = secured
    http = s.archive.http
    victim = ct_dataset(rows=40, cols=40, seed=90)
    assert c_store(s.archive.dicom_port, [victim], calling_ae="STORER") == [0]
    row = s.archive.wait_state(victim.SOPInstanceUID, {"archived"})
    object_path = s.archive.data_dir / "store" / row["object_key"]
    assert object_path.exists()
    response = httpx.delete(
        f"{http}/admin/api/studies/{victim.StudyInstanceUID}", params={"reason": "test"}, headers=s.headers("admin")
    )
    assert response.status_code == 200 and response.json()["instances"] == 1
    assert not object_path.exists()
    assert httpx.get(f"{http}/instances/{victim.SOPInstanceUID}", headers=s.headers("admin")).status_code == 404
    found = httpx.get(
        f"{http}/dicomweb/studies", params={"StudyInstanceUID": victim.StudyInstanceUID}, headers=s.headers("reader")
    ).json()
    assert found == []
    assert (
        httpx.delete(f"{http}/admin/api/studies/{victim.StudyInstanceUID}", headers=s.headers("admin")).status_code
        == 404
    )
    assert (
        httpx.delete(f"{http}/admin/api/studies/{victim.StudyInstanceUID}", headers=s.headers("reader")).status_code
        == 403
    )
    deletions = s.audit(action="delete")
    assert any(e["study_instance_uid"] == victim.StudyInstanceUID and e["actor"] == "admin-key" for e in deletions)


def _rejection_note(target: Dataset, code: str = "113001") -> Dataset:
    from pydicom.uid import generate_uid

    note = ct_dataset(rows=8, cols=8, seed=1, study_uid=target.StudyInstanceUID)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(note, keyword)
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation"):
        delattr(note, keyword)
    note.SOPClassUID = note.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.59"
    note.SOPInstanceUID = note.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    note.Modality = "KO"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", "Rejected for Quality Reasons"
    note.ConceptNameCodeSequence = [title]
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = target.SOPClassUID, target.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = target.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = target.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    note.CurrentRequestedProcedureEvidenceSequence = [study]
    return note


def test_iocm_rejection_note_withdraws_instances(secured: Secured) -> None:
    s = secured
    keep, reject = (ct_dataset(rows=24, cols=24, seed=s_, study_uid=s.ds.StudyInstanceUID) for s_ in (91, 92))
    assert c_store(s.archive.dicom_port, [keep, reject], calling_ae="STORER") == [0, 0]
    for ds in (keep, reject):
        s.archive.wait_state(ds.SOPInstanceUID, {"archived"})
    assert c_store(s.archive.dicom_port, [_rejection_note(reject)], calling_ae="STORER") == [0]
    admin = s.headers("admin")
    assert httpx.get(f"{s.archive.http}/instances/{reject.SOPInstanceUID}", headers=admin).status_code == 404
    assert httpx.get(f"{s.archive.http}/instances/{keep.SOPInstanceUID}", headers=admin).status_code == 200
    withdrawn = [e for e in s.audit(action="delete") if e["interface"] == "iocm"]
    assert [e["sop_instance_uid"] for e in withdrawn] == [reject.SOPInstanceUID]
    assert withdrawn[0]["actor"] == "STORER" and "Quality" in withdrawn[0]["detail"]
