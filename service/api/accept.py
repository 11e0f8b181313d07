"""Accept header negotiation for WADO-RS (PS3.18 8.7): media types, q-values and transfer-syntax."""

from __future__ import annotations

from dataclasses import dataclass

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
ANY_SYNTAX = "*"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DICOM_JSON = "application/dicom+json"


class NotAcceptable(Exception):
    pass


@dataclass(frozen=True)
class MediaRange:
    media_type: str
    params: dict[str, str]
    q: float


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_accept(header: str | None) -> list[MediaRange]:
    """Media ranges, best first (q descending, then the order given).  An absent header is */*."""
    if not header or not header.strip():
        return [MediaRange("*/*", {}, 1.0)]
    ranges = []
    for item in _split_outside_quotes(header, ","):
        pieces = _split_outside_quotes(item, ";")
        if not pieces:  # ";" alone: no media range (unpacking it was a ValueError, a 500)
            continue
        media, *raw_params = pieces
        params: dict[str, str] = {}
        for raw in raw_params:
            name, _, value = raw.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0  # a malformed q-value does not make a range preferred
        if q > 0:
            ranges.append(MediaRange(media.strip().lower(), params, q))
    return sorted(ranges, key=lambda r: -r.q)  # sorted() is stable: ties keep the client's order


@dataclass(frozen=True)
class Packaging:
    multipart: bool
    part_type: str
    # Acceptable transfer syntaxes in the client's order; "*" means "as stored"
    transfer_syntaxes: tuple[str, ...]


def _matches(media_type: str, wanted: str) -> bool:
    if media_type in ("*/*", wanted):
        return True
    return media_type.endswith("/*") and wanted.startswith(media_type[:-1])


def negotiate(header: str | None, part_type: str, *, single_allowed: bool) -> Packaging:
    """The packaging and transfer syntaxes for a retrieve of `part_type` parts (application/dicom
    for instances, application/octet-stream for frames and bulk data).  The first acceptable range
    decides single part vs multipart; transfer syntaxes are gathered from every range of that kind."""
    chosen_multipart: bool | None = None
    syntaxes: list[str] = []
    for media_range in parse_accept(header):
        if media_range.media_type in ("multipart/related", "multipart/*"):
            inner = media_range.params.get("type", part_type).lower()
            if not _matches(inner, part_type):
                continue
            multipart = True
        elif media_range.media_type == part_type:
            if not single_allowed:  # e.g. a study asked for as one application/dicom body
                continue
            multipart = False
        elif _matches(media_range.media_type, part_type):
            multipart = True  # */* and application/*: multipart is what every retrieve can answer
        else:
            continue
        if chosen_multipart is None:
            chosen_multipart = multipart
        if multipart != chosen_multipart:
            continue
        syntax = media_range.params.get("transfer-syntax", EXPLICIT_VR_LE)
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    if chosen_multipart is None:
        raise NotAcceptable(f"none of the accepted media types can carry {part_type}")
    return Packaging(chosen_multipart, part_type, tuple(syntaxes))


def accepts_json(header: str | None) -> bool:
    return any(_matches(r.media_type, DICOM_JSON) or r.media_type == "application/json" for r in parse_accept(header))
