"""Regression tests for what the API fuzzing (tests/service/test_api_fuzz.py) turned up, in-process
(FastAPI's TestClient on a real runtime: SQLite catalog, filesystem store, authentication on):

* the OpenAPI schema documents every answer a route gives: credentials (security schemes, 401, 403),
  error statuses and their bodies, the 5xx that are expected (WADO-RS 500/503, STOW-RS 503, /readyz
  503) and no other, and the media types actually sent (DICOM JSON, multipart/related, text/plain,
  text/csv, HTML, redirects);
* a malformed parameter is 400 with a reason, as everywhere else in the API, not FastAPI's 422;
* a request body is read only once the caller is known: POST /admin/api/keys without credentials is
  401 whatever its body (it was 422, the body parsed before the key was looked at);
* POST /admin/login, open to anyone, reads at most 4 KiB of body (it read all of it into memory);
* GET /admin/api/audit?offset=2**63 was a 500 (the database integer overflowed): offset is bounded;
* /instances/{uid} sent its times without an offset on SQLite ("2026-01-01T10:00:00"), which the
  schema's date-time (RFC 3339) does not admit: they are UTC and now say so (so do /admin/api/keys');
* `Accept: ;` was a 500 on every QIDO-RS and WADO-RS route (parse_accept unpacked an empty item).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.accept import NotAcceptable, accepts_json, negotiate, parse_accept
from service.api.app import build_app, create_app
from service.config import Settings
from service.db import migrate
from service.runtime import Runtime
from service.security import Role, create_key, ensure_admin_password
from tests.archive_support import ct_dataset, part10_bytes

PASSWORD = "regression password"
OPEN = {"/healthz", "/readyz", "/admin", "/admin/login", "/admin/logout", "/admin/static/{name}"}
EXPECTED_5XX = {
    ("GET", "/readyz"): {"503"},
    ("POST", "/dicomweb/studies"): {"503"},  # STOW-RS back-pressure
    ("POST", "/dicomweb/studies/{study_instance_uid}"): {"503"},
}
WADO_5XX = {"500", "503"}  # corrupt instance; decode timeout or store/worker unavailable


def _is_wado(method: str, path: str) -> bool:
    qido = path.endswith(("/series", "/instances"))
    return method == "GET" and path.startswith("/dicomweb/studies/{study}") and not qido


@dataclass
class Api:
    client: TestClient
    keys: dict[str, str]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data_dir: Path = tmp_path_factory.mktemp("api-errors")
    settings = Settings(data_dir=data_dir, require_auth=True, admin_password=PASSWORD)
    migrate(settings.resolved_database_url())
    runtime = Runtime.create(settings)
    try:
        with runtime.session_factory() as session:
            ensure_admin_password(session, PASSWORD, data_dir)
            keys = {role: create_key(session, f"regression-{role}", Role(role)) for role in Role}
        with TestClient(create_app(runtime), follow_redirects=False) as client:
            yield Api(client, keys)
    finally:
        runtime.close()


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in build_app().openapi()["paths"].items():
        for method, operation in operations.items():
            yield method.upper(), path, operation


def test_schema_documents_credentials_and_errors() -> None:
    schema = build_app().openapi()
    assert set(schema["components"]["securitySchemes"]) == {"apiKey", "dashboardSession"}
    for method, path, operation in _operations():
        responses = operation["responses"]
        assert "422" not in responses, (method, path)
        secured = bool(operation.get("security"))
        assert secured == (path not in OPEN), (method, path)
        if secured:
            assert {"401", "403"} <= set(responses), (method, path)
            assert "WWW-Authenticate" in responses["401"]["headers"]
        server_errors = {code for code in responses if code.startswith("5")}
        allowed = WADO_5XX if _is_wado(method, path) else EXPECTED_5XX.get((method, path), set())
        assert server_errors == allowed, (method, path, server_errors)
        if "503" in responses:
            assert "Retry-After" in responses["503"].get("headers", {}) or path == "/readyz", (method, path)
        for code, response in responses.items():
            stow_failures = method == "POST" and code == "409"  # a STOW-RS response (FailedSOPSequence)
            if (code[0] == "4" and not stow_failures) or (code == "500" and _is_wado(method, path)):
                assert set(response["content"]) == {"application/json"}, (method, path, code)


def test_schema_media_types() -> None:
    def media(path: str, method: str = "get", code: str = "200") -> set[str]:
        return set(build_app().openapi()["paths"][path][method]["responses"][code].get("content", {}))

    assert media("/dicomweb/studies") == {"application/dicom+json"}
    assert media("/dicomweb/studies/{study}/series/{series}/instances") == {"application/dicom+json"}
    assert media("/dicomweb/studies/{study}/metadata") == {"application/dicom+json"}
    assert media("/dicomweb/studies/{study}") == {"multipart/related"}
    assert media("/dicomweb/studies/{study}/series/{series}/instances/{sop}") == {
        "multipart/related",
        "application/dicom",
    }
    assert media("/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}") == {
        "multipart/related"
    }
    assert media("/metrics") == {"text/plain"}
    assert media("/admin/api/audit.csv") == {"text/csv"}
    assert media("/admin/static/{name}") == {"text/javascript", "text/css"}
    assert media("/admin/login", "post", "303") == set()
    names = {p["name"] for p in build_app().openapi()["paths"]["/dicomweb/studies"]["get"]["parameters"]}
    assert {"limit", "offset", "includefield", "fuzzymatching", "PatientName", "StudyDate", "Modality"} <= names


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/admin/api/savings", {"days": "0"}),
        ("/admin/api/savings", {"days": "abc"}),
        ("/admin/api/studies", {"limit": "0"}),
        ("/admin/api/studies", {"q": "x" * 65}),
        ("/admin/api/tombstones", {"limit": "1.5"}),
        ("/admin/api/audit", {"offset": "-1"}),
        ("/admin/api/audit", {"offset": str(2**63)}),  # was a 500: the database integer overflowed
        ("/admin/api/audit.csv", {"offset": str(10**20)}),
        ("/admin/api/audit.csv", {"limit": "many"}),
        ("/admin/login", {"error": ["1", "2"]}),
    ],
)
def test_malformed_parameter_is_400(api: Api, path: str, params: dict[str, Any]) -> None:
    response = api.client.get(path, params=params, headers=api.auth("admin"))
    assert response.status_code == 400 if path != "/admin/login" else response.status_code in (200, 400)
    if response.status_code == 400:
        body = response.json()
        assert set(body) == {"detail"} and body["detail"], body
        for value in params.values():  # the reason names the parameter, never echoes the value
            assert not isinstance(value, str) or len(value) < 2 or value not in body["detail"]
    if path.startswith("/admin/api"):
        # Without credentials the answer is 401, whatever the parameters
        assert api.client.get(path, params=params).status_code == 401


def test_key_body_is_read_after_the_credentials(api: Api) -> None:
    post = api.client.post
    broken = {"content": b'{"name": ', "headers": {"Content-Type": "application/json"}}
    assert post("/admin/api/keys", **broken).status_code == 401  # was 422: parsed before the key was looked at
    bogus = {"Authorization": "Bearer lvpa_unknown", "Content-Type": "application/json"}
    assert post("/admin/api/keys", content=b'{"name": ', headers=bogus).status_code == 401
    reader = {**api.auth("reader"), "Content-Type": "application/json"}
    assert post("/admin/api/keys", content=b'{"name": ', headers=reader).status_code == 403
    admin = {**api.auth("admin"), "Content-Type": "application/json"}
    for body in (b'{"name": ', b"[]", b'{"name": "a b", "role": "reader"}', b'{"name": "ok", "role": "root"}', b""):
        response = post("/admin/api/keys", content=body, headers=admin)
        assert response.status_code == 400, (body, response.text)
        assert set(response.json()) == {"detail"}
    assert post("/admin/api/keys", content=b" " * 5000, headers=admin).status_code == 413
    created = post("/admin/api/keys", json={"name": "regression-new", "role": "reader"}, headers=api.auth("admin"))
    assert created.status_code == 201 and created.json()["key"].startswith("lvpa_")
    again = post("/admin/api/keys", json={"name": "regression-new", "role": "reader"}, headers=api.auth("admin"))
    assert again.status_code == 409


def test_login_reads_a_bounded_body(api: Api) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    too_large = api.client.post("/admin/login", content=b"secret=" + b"x" * 5000, headers=form)
    assert too_large.status_code == 413 and "set-cookie" not in too_large.headers
    refused = api.client.post("/admin/login", content=b"secret=wrong", headers=form)
    assert refused.status_code == 303 and refused.headers["location"] == "/admin/login?error=1"
    ok = api.client.post("/admin/login", data={"secret": PASSWORD})
    assert ok.status_code == 303 and ok.headers["location"] == "/admin" and "lvp_session" in ok.cookies


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    header=st.one_of(st.none(), st.text(st.sampled_from(';,="*/\t q.0123456789+-abcdijmnoprstuxy'), max_size=60)),
    part=st.sampled_from(["application/dicom", "application/octet-stream"]),
    single=st.booleans(),
)
def test_accept_parsing_never_fails(header: str | None, part: str, single: bool) -> None:
    """Any Accept value is a packaging or NotAcceptable (406), never another exception (a 500)."""
    parse_accept(header)
    accepts_json(header)
    try:
        packaging = negotiate(header, part, single_allowed=single)
    except NotAcceptable:
        return
    assert packaging.transfer_syntaxes and (packaging.multipart or single)


@pytest.mark.parametrize("accept", [";", " ; ", ";,;", ";q=1"])
@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies",
        "/dicomweb/studies/1.2.3/series",
        "/dicomweb/studies/1.2.3",
        "/dicomweb/studies/1.2.3/metadata",
    ],
)
def test_accept_without_media_range_is_406(api: Api, path: str, accept: str) -> None:
    response = api.client.get(path, headers={**api.auth("reader"), "Accept": accept})
    assert response.status_code == 406, response.text  # was a 500 (ValueError in parse_accept)
    assert set(response.json()) == {"error"}


def test_times_carry_their_offset(api: Api) -> None:
    ds = ct_dataset(rows=16, cols=16, seed=5)
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10_bytes(ds) + b"\r\n--b--\r\n"
    stow_headers = {**api.auth("uploader"), "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
    assert api.client.post("/dicomweb/studies", content=body, headers=stow_headers).status_code == 200
    versions = api.client.get(f"/instances/{ds.SOPInstanceUID}", headers=api.auth("admin")).json()
    times = [
        versions[0]["received_at"],
        *(key["created_at"] for key in api.client.get("/admin/api/keys", headers=api.auth("admin")).json()),
    ]
    for text in times:
        assert datetime.fromisoformat(text).utcoffset() is not None, text  # was naive on SQLite
