from __future__ import annotations

from pathlib import Path

import pytest

from service.api.multipart import MultipartError, MultipartRelatedParser, PartTooLarge

BODY = (
    b"preamble\r\n--b0undary\r\nContent-Type: application/dicom\r\n\r\nFIRST\r\n--b0und\r\n"
    b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nSECOND\r\n--b0undary--\r\n"
)


@pytest.mark.parametrize("chunk", [1, 3, 7, len(BODY)])
def test_parts_stream_to_files_whatever_the_chunking(tmp_path: Path, chunk: int) -> None:
    parser = MultipartRelatedParser(b"b0undary", tmp_path, max_part_bytes=100)
    for start in range(0, len(BODY), chunk):
        parser.feed(BODY[start : start + chunk])
    parts = parser.close()
    assert [p.path.read_bytes() for p in parts] == [b"FIRST\r\n--b0und", b"SECOND"]
    assert parts[0].headers["content-type"] == "application/dicom"


def test_part_over_the_limit_stops_the_parse(tmp_path: Path) -> None:
    parser = MultipartRelatedParser(b"b0undary", tmp_path, max_part_bytes=10)
    with pytest.raises(PartTooLarge):
        parser.feed(b"--b0undary\r\n\r\n" + b"x" * 100)
    parser.discard()
    assert list(tmp_path.iterdir()) == []


def test_unterminated_body_is_an_error(tmp_path: Path) -> None:
    parser = MultipartRelatedParser(b"b0undary", tmp_path, max_part_bytes=100)
    parser.feed(b"--b0undary\r\n\r\nabc")
    with pytest.raises(MultipartError):
        parser.close()
