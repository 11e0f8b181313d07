"""Object stores: the filesystem one, and the S3 one against moto's standalone server on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.storage import InvalidKeyError, ObjectNotFoundError, ObjectStore
from service.storage.filesystem import FilesystemStore
from service.storage.s3 import S3Store
from tests.archive_support import moto_s3


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    s3 = S3Store("archive", "prefix", endpoint_url=endpoint, access_key_id="test", secret_access_key="test")
    s3.client.create_bucket(Bucket="archive")
    return s3


def test_put_get_list_delete(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"\x00\x01" * 1000)
    store.put_file("staging/a.dcm", source)
    assert source.exists()
    store.put_file("staging/b.dcm", source, move=True)
    assert not source.exists()
    store.put_bytes("objects/ab/cd/abcd.lva", b"record")
    assert store.get_bytes("staging/b.dcm") == b"\x00\x01" * 1000
    assert store.size("objects/ab/cd/abcd.lva") == 6
    assert sorted(store.iter_keys("staging/")) == ["staging/a.dcm", "staging/b.dcm"]
    assert list(store.iter_keys("objects/ab/")) == ["objects/ab/cd/abcd.lva"]
    assert list(store.iter_keys("nothing/")) == []
    modified = store.modified_at("staging/b.dcm")
    assert modified is not None and abs(modified - time.time()) < 120
    assert store.modified_at("staging/none.dcm") is None
    listed = dict(store.iter_modified("staging/"))
    assert sorted(listed) == ["staging/a.dcm", "staging/b.dcm"]
    assert all(abs(seconds - modified) < 120 for seconds in listed.values())
    store.delete("staging/a.dcm")
    store.delete("staging/a.dcm")  # absent: no error
    assert not store.exists("staging/a.dcm")
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("staging/a.dcm")


@pytest.mark.parametrize(
    "key", ["../escape", "/absolute", "a/../../b", "a//b", ".hidden", "a/.tmp-x", "with space", "a\\b", ""]
)
def test_keys_that_could_escape_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")


def test_filesystem_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    store.put_bytes("objects/x.lva", b"1")
    store.put_bytes("objects/x.lva", b"2")  # replaced atomically
    assert store.get_bytes("objects/x.lva") == b"2"
    assert [p.name for p in (tmp_path / "store" / "objects").iterdir()] == ["x.lva"]
