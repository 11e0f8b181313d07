"""The one matching engine behind QIDO-RS and C-FIND (and the instance selection of C-MOVE/C-GET).

A `Query` is parsed from QIDO-RS query parameters (`parse_qido`) or from a C-FIND/C-MOVE/C-GET
Identifier (`query_from_identifier`), then run against the catalog (`run_query`, `search_page`,
`matching_instances`).  No FastAPI or pynetdicom here.

Matching follows PS3.4 C.2.2.2 and PS3.18 8.3.4:

* an empty value (or `*` alone) is universal matching: everything matches and the key is returned;
* a value without wildcards is single value matching: exact, case-sensitive, except PN which is
  case-insensitive (SQL lower(): ASCII only on SQLite, Unicode on PostgreSQL);
* `*` and `?` are wildcards (not for UI, DA, TM, IS, US), run as SQL LIKE with an escape character
  so that `%`, `_` and `\\` in a value stand for themselves; values are always bound parameters;
* DA and TM take ranges `A-B`, `-B` and `A-`;
* UI keys take a list of UIDs (List of UID matching), as do CS keys (any listed value matches);
* a PN value matches the whole stored name or any one of its `=`-separated component groups
  (alphabetic, ideographic, phonetic), so `Yamada^Tarou` and `山田^太郎` both find
  `Yamada^Tarou=山田^太郎=やまだ^たろう`.

Only what the archive can hand back is visible: the newest version of each SOP instance among
the versions that are not superseded and still hold bytes (not `failed` without a staged copy).
Patients, studies and series without a visible instance do not exist for a query; the
NumberOf...Related... counts are SQL aggregates over visible instances, and ModalitiesInStudy and
SOPClassesInStudy are gathered from them too (matched with EXISTS, returned by one query per batch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import IntEnum
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, and_, distinct, func, or_, select
from sqlalchemy.orm import Session, aliased

from service.catalog.tables import Instance, InstanceState, Patient, Series, Study
from service.dicomfile import is_valid_uid

# C-FIND failure statuses (PS3.4 C.4.1.1.4)
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

DEFAULT_LIMIT = 1000  # QIDO results per response when the client names no limit
MAX_LIMIT = 10000  # and at most, whatever it names
MORE_RESULTS_WARNING = "There are additional results that can be requested"
UTF8 = "ISO_IR 192"
_ESCAPE = "\\"


class QueryError(Exception):
    """A query the archive cannot run.  `reason` names keys and rules, never quotes a value from a
    C-FIND identifier (it is logged); `status` is the C-FIND failure status (QIDO answers 400)."""

    def __init__(self, reason: str, status: int = UNABLE_TO_PROCESS) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Level(IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3  # QIDO "instances"


_TABLE_OF = {Level.PATIENT: Patient, Level.STUDY: Study, Level.SERIES: Series, Level.IMAGE: Instance}

# Values computed rather than read from a column
# Study values gathered from the study's visible instances (series.modality, instance.sop_class_uid)
MODALITIES = "modalities"
SOP_CLASSES = "sop-classes"
_GATHERED = (MODALITIES, SOP_CLASSES)
AVAILABILITY = "availability"
PATIENT_STUDIES, PATIENT_SERIES, PATIENT_INSTANCES = "patient-studies", "patient-series", "patient-instances"
STUDY_SERIES, STUDY_INSTANCES, SERIES_INSTANCES = "study-series", "study-instances", "series-instances"
_COUNTS = {PATIENT_STUDIES, PATIENT_SERIES, PATIENT_INSTANCES, STUDY_SERIES, STUDY_INSTANCES, SERIES_INSTANCES}


@dataclass(frozen=True)
class Attribute:
    tag: int
    keyword: str
    vr: str
    level: Level
    column: str | None = None  # column of the level's table
    computed: str | None = None
    matchable: bool = True  # usable as a matching key (else return key only)


def _attr(keyword: str, level: Level, column: str | None = None, **kwargs: Any) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(int(tag), keyword, dictionary_VR(tag), level, column, **kwargs)


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE
ATTRIBUTES: tuple[Attribute, ...] = (
    _attr("PatientName", P, "patient_name"),
    _attr("PatientID", P, "patient_id"),
    _attr("IssuerOfPatientID", P, "issuer_of_patient_id"),
    _attr("PatientBirthDate", P, "patient_birth_date"),
    _attr("PatientSex", P, "patient_sex"),
    _attr("NumberOfPatientRelatedStudies", P, computed=PATIENT_STUDIES, matchable=False),
    _attr("NumberOfPatientRelatedSeries", P, computed=PATIENT_SERIES, matchable=False),
    _attr("NumberOfPatientRelatedInstances", P, computed=PATIENT_INSTANCES, matchable=False),
    # Every object the archive holds is on line; a level-independent return key
    _attr("InstanceAvailability", P, computed=AVAILABILITY, matchable=False),
    _attr("StudyInstanceUID", ST, "study_instance_uid"),
    _attr("StudyDate", ST, "study_date"),
    _attr("StudyTime", ST, "study_time"),
    _attr("AccessionNumber", ST, "accession_number"),
    _attr("StudyID", ST, "study_id"),
    _attr("StudyDescription", ST, "study_description"),
    _attr("ReferringPhysicianName", ST, "referring_physician_name"),
    _attr("ModalitiesInStudy", ST, computed=MODALITIES),
    _attr("SOPClassesInStudy", ST, computed=SOP_CLASSES),
    _attr("NumberOfStudyRelatedSeries", ST, computed=STUDY_SERIES, matchable=False),
    _attr("NumberOfStudyRelatedInstances", ST, computed=STUDY_INSTANCES, matchable=False),
    _attr("SeriesInstanceUID", SE, "series_instance_uid"),
    _attr("Modality", SE, "modality"),
    _attr("SeriesNumber", SE, "series_number"),
    _attr("SeriesDescription", SE, "series_description"),
    _attr("BodyPartExamined", SE, "body_part_examined"),
    _attr("NumberOfSeriesRelatedInstances", SE, computed=SERIES_INSTANCES, matchable=False),
    _attr("SOPClassUID", IM, "sop_class_uid"),
    _attr("SOPInstanceUID", IM, "sop_instance_uid"),
    _attr("InstanceNumber", IM, "instance_number"),
    _attr("Rows", IM, "rows"),
    _attr("Columns", IM, "columns"),
    _attr("BitsAllocated", IM, "bits_allocated"),
    _attr("BitsStored", IM, "bits_stored"),
    _attr("SamplesPerPixel", IM, "samples_per_pixel"),
    _attr("PhotometricInterpretation", IM, "photometric_interpretation"),
    _attr("NumberOfFrames", IM, "number_of_frames"),
)
BY_TAG = {a.tag: a for a in ATTRIBUTES}
BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}


def _keys(*keywords: str) -> tuple[Attribute, ...]:
    return tuple(BY_KEYWORD[k] for k in keywords)


# PS3.18 Tables 10.6.3-3/-4/-5 (attributes the archive holds), plus the UIDs of the levels above,
# which a client needs to address what it found
STUDY_RETURN = _keys(
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN = _keys(
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_RETURN = _keys(
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# PS3.4 C.6: the unique key of each level
UNIQUE_KEY = {
    Level.PATIENT: BY_KEYWORD["PatientID"],
    Level.STUDY: BY_KEYWORD["StudyInstanceUID"],
    Level.SERIES: BY_KEYWORD["SeriesInstanceUID"],
    Level.IMAGE: BY_KEYWORD["SOPInstanceUID"],
}
InformationModel = Literal["patient", "study"]
_LEVEL_NAMES = {"PATIENT": Level.PATIENT, "STUDY": Level.STUDY, "SERIES": Level.SERIES, "IMAGE": Level.IMAGE}
_WILDCARD_VRS = {"PN", "LO", "SH", "CS", "LT", "ST", "UT", "UC", "AE"}
_LIST_VRS = {"UI", "CS"}  # QIDO: comma- or backslash-separated values are alternatives
_QR_LEVEL_TAG = 0x00080052
_CHARSET_TAG = 0x00080005
_RETRIEVE_AE_TAG = 0x00080054


# ------------------------------------------------------------------------------ the query


@dataclass(frozen=True)
class Term:
    kind: Literal["eq", "like", "range"]
    value: str | int | None = None  # eq: the value; like: the LIKE pattern (escaped)
    low: str | None = None  # range bounds, either may be absent
    high: str | None = None
    groups: bool = True  # PN: may match one `=` component group, not only the whole name


@dataclass(frozen=True)
class Match:
    """One key: the row matches if any of the terms matches."""

    attribute: Attribute
    terms: tuple[Term, ...]


@dataclass
class Query:
    level: Level
    matches: list[Match] = field(default_factory=list)
    # Returned in every result: supported attributes at or above the level ...
    returns: list[Attribute] = field(default_factory=list)
    # ... and keys the archive does not support, returned zero-length: (tag, VR)
    empty_returns: list[tuple[int, str]] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    # QIDO: Warning header texts; C-FIND: optional keys were not supported for matching (0xFF01)
    warnings: list[str] = field(default_factory=list)
    unsupported_matching: bool = False
    # C-FIND: the level as the identifier named it, returned in every response
    query_retrieve_level: str | None = None
    information_model: InformationModel | None = None
    requested_limit: int | None = None  # QIDO: what the client asked for, before capping


# ------------------------------------------------------------------------------ values -> terms


_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(?:[01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?$")


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as a LIKE pattern with `\\` as the escape character."""
    out = []
    for char in value:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append(_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def _check_date(value: str, keyword: str) -> str:
    if not _DA.match(value):
        raise QueryError(f"{keyword}: a date is YYYYMMDD, a range YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryError(f"{keyword}: not a calendar date") from None
    return value


def _check_time(value: str, keyword: str) -> str:
    if not _TM.match(value):
        raise QueryError(f"{keyword}: a time is HH[MM[SS[.FFFFFF]]], a range A-B, -B or A-")
    return value


def _time_upper(value: str) -> str:
    """The last moment a (possibly partial) time names: 1030 -> 103059.999999."""
    whole, _, fraction = value.partition(".")
    whole = whole + "5959"[len(whole) - 2 :] if len(whole) < 6 else whole
    return f"{whole}.{(fraction + '999999')[:6]}" if fraction else whole + ".999999"


def _range_term(attribute: Attribute, value: str) -> Term | None:
    low, sep, high = value.partition("-")
    check = _check_date if attribute.vr == "DA" else _check_time
    if sep and "-" in high:
        raise QueryError(f"{attribute.keyword}: a range has one '-'")
    if not sep:
        return Term("eq", check(value, attribute.keyword))
    low, high = low.strip(), high.strip()
    if not low and not high:
        return None  # "-": every value
    if low:
        check(low, attribute.keyword)
    if high:
        check(high, attribute.keyword)
    upper = high if attribute.vr == "DA" or not high else _time_upper(high)
    if low and high and low > upper:
        raise QueryError(f"{attribute.keyword}: the range ends before it starts")
    return Term("range", low=low or None, high=upper or None)


def _term(attribute: Attribute, value: str) -> Term | None:
    """One alternative of a key's value; None: universal."""
    if value == "" or value == "*":
        return None
    keyword, vr = attribute.keyword, attribute.vr
    wild = "*" in value or "?" in value
    if wild and vr not in _WILDCARD_VRS:
        raise QueryError(f"{keyword}: wildcards are not allowed for {vr} keys")
    if vr in ("DA", "TM"):
        return _range_term(attribute, value)
    if vr == "UI":
        if not is_valid_uid(value):
            raise QueryError(f"{keyword}: malformed UID")
        return Term("eq", value)
    if vr in ("IS", "US"):
        if not re.fullmatch(r"[+-]?\d{1,10}", value):
            raise QueryError(f"{keyword}: not an integer")
        number = int(value)
        if not -(2**31) <= number < 2**31:
            raise QueryError(f"{keyword}: integer out of range")
        return Term("eq", number)
    if len(value) > 1024:
        raise QueryError(f"{keyword}: value too long")
    if vr == "PN":
        return Term("like", like_pattern(value), groups="=" not in value)
    return Term("like", like_pattern(value)) if wild else Term("eq", value)


def _match(attribute: Attribute, values: Iterable[str]) -> Match | None:
    """A key with alternatives `values` (OR); None when it matches everything."""
    terms = []
    for raw in values:
        term = _term(attribute, raw.strip())
        if term is None:
            return None
        terms.append(term)
    return Match(attribute, tuple(terms)) if terms else None


# ------------------------------------------------------------------------------ QIDO-RS


def _resolve_tag(name: str) -> int | None:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def _attribute_id(name: str) -> tuple[int | None, bool]:
    """(tag, valid): the tag of a QIDO attribute ID (keyword, 8 hex digits, or a dotted sequence
    path, which is valid but gets tag None: not supported)."""
    if "." in name:
        return None, all(_resolve_tag(part) is not None for part in name.split("."))
    tag = _resolve_tag(name)
    return tag, tag is not None


def _shown(name: str) -> str:
    """A parameter name quoted in an error: printable ASCII only, bounded."""
    return "".join(c if 32 < ord(c) < 127 else "?" for c in name[:64])


def _non_negative(name: str, value: str) -> int:
    if not re.fullmatch(r"\d{1,9}", value.strip()):
        raise QueryError(f"{name} must be a non-negative integer")
    return int(value)


def _add(returns: list[Attribute], attribute: Attribute) -> None:
    if attribute not in returns:
        returns.append(attribute)


def parse_qido(level: Level, params: Sequence[tuple[str, str]], scope: dict[str, str] | None = None) -> Query:
    """A QIDO-RS search (PS3.18 10.6) at `level` (STUDY, SERIES or IMAGE for instances).

    `params` are the query parameters in order, repeated names included; `scope` the UIDs of the
    path (`StudyInstanceUID`, `SeriesInstanceUID`).  Raises QueryError for what answers 400."""
    if level == Level.PATIENT:
        raise QueryError("QIDO-RS has no patient level")
    scope = scope or {}
    query = Query(level)
    ignored: list[str] = []
    not_returned: list[str] = []
    include_all = False
    includes: list[Attribute] = []
    by_attribute: dict[Attribute, list[str]] = {}
    fuzzy = False
    for name, value in params:
        if name == "includefield":
            for item in filter(None, (v.strip() for v in value.split(","))):
                if item == "all":
                    include_all = True
                    continue
                tag, valid = _attribute_id(item)
                if not valid:
                    raise QueryError(f"includefield: {_shown(item)} is not a DICOM keyword or tag")
                attribute = BY_TAG.get(tag) if tag is not None else None
                if attribute is None:
                    ignored.append(item)
                elif attribute.level > level:
                    not_returned.append(item)
                else:
                    includes.append(attribute)
        elif name == "limit":
            query.requested_limit = _non_negative("limit", value)
        elif name == "offset":
            query.offset = _non_negative("offset", value)
        elif name == "fuzzymatching":
            if value.strip().lower() not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            fuzzy = fuzzy or value.strip().lower() == "true"
        else:
            tag, valid = _attribute_id(name)
            if not valid:
                raise QueryError(f"{_shown(name)} is not a DICOM keyword or tag, nor a QIDO-RS parameter")
            attribute = BY_TAG.get(tag) if tag is not None else None
            if attribute is None or not attribute.matchable:
                ignored.append(name)
                if attribute is not None and attribute.level <= level:
                    includes.append(attribute)
                continue
            by_attribute.setdefault(attribute, []).append(value)

    for attribute, values in by_attribute.items():
        if attribute.vr in _LIST_VRS:
            # One key: any of the listed values (List of UID matching, and value lists for CS)
            alternatives = [v for value in values for v in re.split(r"[,\\]", value)]
            match = _match(attribute, alternatives)
            if match is not None:
                query.matches.append(match)
        else:
            # Given more than once: every condition holds
            for value in values:
                match = _match(attribute, [value])
                if match is not None:
                    query.matches.append(match)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword in scope:
            if not is_valid_uid(scope[keyword]):
                raise QueryError(f"malformed {keyword} in the path")
            query.matches.append(Match(BY_KEYWORD[keyword], (Term("eq", scope[keyword]),)))

    returns: list[Attribute] = []
    if level == Level.STUDY:
        returns.extend(STUDY_RETURN)
    elif level == Level.SERIES:
        returns.extend(SERIES_RETURN)
        if "StudyInstanceUID" not in scope:
            returns.extend(STUDY_RETURN)
    else:
        returns.extend(INSTANCE_RETURN)
        if "SeriesInstanceUID" not in scope:
            returns.extend(SERIES_RETURN)
        if "StudyInstanceUID" not in scope:
            returns.extend(STUDY_RETURN)
    for attribute in [*by_attribute, *includes]:
        if attribute.level <= level:
            returns.append(attribute)
    if include_all:
        returns.extend(a for a in ATTRIBUTES if a.level <= level)
    for attribute in returns:
        _add(query.returns, attribute)

    requested = query.requested_limit
    query.limit = DEFAULT_LIMIT if requested is None else min(requested, MAX_LIMIT)
    if requested is not None and requested > MAX_LIMIT:
        query.warnings.append(f"The limit has been reduced to {MAX_LIMIT}, the most this origin server returns")
    if fuzzy:
        query.warnings.append("The fuzzymatching parameter is not supported. Only literal matching has been performed.")
    if ignored:
        shown = ", ".join(dict.fromkeys(_shown(n) for n in ignored))
        query.warnings.append(f"The following attributes are not supported for matching or return: {shown}")
    if not_returned:
        shown = ", ".join(dict.fromkeys(_shown(n) for n in not_returned))
        query.warnings.append(f"The following attributes are below the level searched and not returned: {shown}")
    return query


# ------------------------------------------------------------------------------ C-FIND identifiers


# Unique keys that must be given for the levels above the query level (hierarchical queries)
_HIERARCHY: dict[str, dict[Level, tuple[str, ...]]] = {
    "patient": {
        Level.STUDY: ("PatientID",),
        Level.SERIES: ("PatientID", "StudyInstanceUID"),
        Level.IMAGE: ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"),
    },
    "study": {
        Level.SERIES: ("StudyInstanceUID",),
        Level.IMAGE: ("StudyInstanceUID", "SeriesInstanceUID"),
    },
}
_MODEL_UNIQUE_KEYS: dict[str, tuple[Level, ...]] = {
    "patient": (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
    "study": (Level.STUDY, Level.SERIES, Level.IMAGE),
}


def _element_values(element: Any) -> list[str]:
    value = element.value
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        raise QueryError(f"{element.keyword or 'a key'}: undecodable value")
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(item).strip() for item in items if str(item).strip()]


def query_from_identifier(identifier: Dataset, information_model: InformationModel) -> Query:
    """A C-FIND (or C-MOVE/C-GET) Identifier under the Patient Root or Study Root information model.

    Keys the archive does not support are ignored for matching and returned zero-length (PS3.4
    C.2.2.1); `unsupported_matching` says one of them had a value (pending status 0xFF01).  Keys of
    levels below the query level are treated the same way.  Raises QueryError: 0xA900 for a missing
    or invalid Query/Retrieve Level or missing unique keys of the levels above, 0xC000 for values
    that cannot be matched (a malformed date range, wildcards in a UID, ...)."""
    if information_model not in _HIERARCHY:
        raise QueryError("unknown information model", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    try:
        raw_level = identifier.get("QueryRetrieveLevel", None)
    except Exception:
        raise QueryError("undecodable Query/Retrieve Level", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) from None
    level_name = str(raw_level or "").strip().upper()
    if level_name not in _LEVEL_NAMES:
        raise QueryError("missing or unknown Query/Retrieve Level", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    level = _LEVEL_NAMES[level_name]
    if information_model == "study" and level == Level.PATIENT:
        raise QueryError("Study Root has no PATIENT level", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    query = Query(level, query_retrieve_level=level_name, information_model=information_model)

    values: dict[str, list[str]] = {}
    try:
        elements = list(identifier)
        for element in elements:
            tag = int(element.tag)
            if tag >> 16 in (0x0000, 0x0002) or tag >> 16 & 1 or tag in (_QR_LEVEL_TAG, _CHARSET_TAG):
                continue  # command/meta groups, private keys, and the two handled here
            attribute = BY_TAG.get(tag)
            if element.VR == "SQ":
                # Sequence matching is not supported: returned empty, matched by nothing
                query.empty_returns.append((tag, "SQ"))
                query.unsupported_matching |= any(len(item) for item in element.value or [])
                continue
            if attribute is None or attribute.level > level:
                if tag != _RETRIEVE_AE_TAG:
                    query.empty_returns.append((tag, element.VR))
                    query.unsupported_matching |= not element.is_empty
                continue
            items = _element_values(element)
            _add(query.returns, attribute)
            if not attribute.matchable:
                query.unsupported_matching |= bool(items)
                continue
            values[attribute.keyword] = items
            match = _match(attribute, items)
            if match is not None:
                query.matches.append(match)
    except QueryError:
        raise
    except Exception as exc:  # pydicom decodes lazily: a broken value surfaces here
        raise QueryError(f"undecodable identifier ({type(exc).__name__})") from None

    for keyword in _HIERARCHY[information_model].get(level, ()):
        given = values.get(keyword)
        if not given:
            raise QueryError(f"{keyword} is required at this level", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        if any("*" in v or "?" in v for v in given) or (keyword == "PatientID" and len(given) > 1):
            raise QueryError(f"{keyword} needs a single value at this level", IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
    for unique_level in _MODEL_UNIQUE_KEYS[information_model]:
        if unique_level <= level:
            _add(query.returns, UNIQUE_KEY[unique_level])
    return query


# ------------------------------------------------------------------------------ SQL


def _held(instance: Any) -> ColumnElement[bool]:
    """A version the archive still holds bytes of."""
    return and_(
        instance.state != InstanceState.SUPERSEDED,
        or_(instance.state != InstanceState.FAILED, instance.staging_key.is_not(None)),
    )


def visible(instance: Any = Instance) -> ColumnElement[bool]:
    """`instance` (the Instance table or an alias of it) is what queries see of its SOP instance:
    held, and no newer version is held.  (While a new version waits for compression under the
    overwrite policy, the old one is held too; the new one is the current version.)"""
    newer = aliased(Instance)
    superseding = (
        select(newer.id)
        .where(newer.sop_instance_uid == instance.sop_instance_uid, newer.version > instance.version, _held(newer))
        .correlate_except(newer)
    )
    return and_(_held(instance), ~superseding.exists())


def _visible_below(tables: dict[Level, Any], level: Level) -> tuple[Any, Any, Any, list[ColumnElement[bool]]]:
    """Aliases (instance, series, study) for a subquery over the visible instances under the row
    of `level` in `tables`, with the correlating conditions."""
    instance, series, study = aliased(Instance), aliased(Series), aliased(Study)
    if level == Level.SERIES:
        conditions = [instance.series_pk == tables[Level.SERIES].id]
    elif level == Level.STUDY:
        conditions = [instance.series_pk == series.id, series.study_pk == tables[Level.STUDY].id]
    else:
        conditions = [
            instance.series_pk == series.id,
            series.study_pk == study.id,
            study.patient_pk == tables[Level.PATIENT].id,
        ]
    return instance, series, study, [*conditions, visible(instance)]


def _count(name: str, tables: dict[Level, Any]) -> Any:
    level = {
        PATIENT_STUDIES: Level.PATIENT,
        PATIENT_SERIES: Level.PATIENT,
        PATIENT_INSTANCES: Level.PATIENT,
        STUDY_SERIES: Level.STUDY,
        STUDY_INSTANCES: Level.STUDY,
        SERIES_INSTANCES: Level.SERIES,
    }[name]
    instance, series, study, conditions = _visible_below(tables, level)
    if name == PATIENT_STUDIES:
        counted = func.count(distinct(series.study_pk))
    elif name in (PATIENT_SERIES, STUDY_SERIES):
        counted = func.count(distinct(instance.series_pk))
    else:
        counted = func.count(instance.id)
    correlated = [t for t in tables.values() if t not in (instance, series, study)]
    return select(counted).where(*conditions).correlate(*correlated).scalar_subquery()


def _term_clause(attribute: Attribute, term: Term, column: Any) -> ColumnElement[bool]:
    if attribute.vr == "PN":
        assert isinstance(term.value, str)
        name = func.lower(column)
        patterns = [term.value]
        if term.groups:  # the whole name, or one component group of it
            patterns += [term.value + "=%", "%=" + term.value, "%=" + term.value + "=%"]
        return or_(*(name.like(func.lower(p), escape=_ESCAPE) for p in patterns))
    if term.kind == "eq":
        return column == term.value
    if term.kind == "like":
        return column.like(term.value, escape=_ESCAPE)
    bounds = []
    if term.low is not None:
        bounds.append(column >= term.low)
    if term.high is not None:
        bounds.append(column <= term.high)
    return and_(*bounds)


def _match_clause(match: Match, tables: dict[Level, Any]) -> ColumnElement[bool]:
    attribute = match.attribute
    if attribute.computed in _GATHERED:
        # Any of the study's values matches: a visible instance (of a series) with a matching one
        instance, series, study, conditions = _visible_below(tables, Level.STUDY)
        if attribute.computed == MODALITIES:
            column, single = series.modality, BY_KEYWORD["Modality"]
        else:
            column, single = instance.sop_class_uid, BY_KEYWORD["SOPClassUID"]
        matched = or_(*(_term_clause(single, term, column) for term in match.terms))
        return select(instance.id).where(*conditions, matched).correlate_except(instance, series, study).exists()
    column = getattr(tables[attribute.level], str(attribute.column))
    return or_(*(_term_clause(attribute, term, column) for term in match.terms))


def _conditions(query: Query, tables: dict[Level, Any], level: Level) -> list[ColumnElement[bool]]:
    """WHERE conditions for rows of `level`: keys at or above it directly, keys of lower levels
    (QIDO only) as one EXISTS over the visible instances below the row."""
    conditions = [_match_clause(m, tables) for m in query.matches if m.attribute.level <= level]
    below = [m for m in query.matches if m.attribute.level > level]
    if below:
        instance, series, study, correlation = _visible_below(tables, level)
        inner = {**tables, Level.SERIES: series, Level.IMAGE: instance}
        if level == Level.PATIENT:
            inner[Level.STUDY] = study
        matched = [_match_clause(m, inner) for m in below]
        conditions.append(
            select(instance.id).where(*correlation, *matched).correlate_except(instance, series, study).exists()
        )
    return conditions


def _tables(level: Level) -> dict[Level, Any]:
    return {lvl: _TABLE_OF[lvl] for lvl in Level if lvl <= level}


def _from(level: Level) -> Any:
    """SELECT ... FROM the level's table joined up to the patient."""
    if level == Level.IMAGE:
        return (
            Instance.__table__.join(Series, Instance.series_pk == Series.id)
            .join(Study, Series.study_pk == Study.id)
            .join(Patient, Study.patient_pk == Patient.id)
        )
    if level == Level.SERIES:
        return Series.__table__.join(Study, Series.study_pk == Study.id).join(Patient, Study.patient_pk == Patient.id)
    if level == Level.STUDY:
        return Study.__table__.join(Patient, Study.patient_pk == Patient.id)
    return Patient.__table__


def _exists_visible(level: Level, tables: dict[Level, Any]) -> ColumnElement[bool]:
    if level == Level.IMAGE:
        return visible(Instance)
    instance, series, study, conditions = _visible_below(tables, level)
    return select(instance.id).where(*conditions).correlate_except(instance, series, study).exists()


def _statement(query: Query) -> Any:
    level = query.level
    tables = _tables(level)
    entity = tables[level]
    columns: list[Any] = [entity.id.label("pk")]
    if level >= Level.STUDY:
        columns.append(Study.id.label("study_pk"))
    for attribute in query.returns:
        if attribute.level > level or attribute.computed in (*_GATHERED, AVAILABILITY):
            continue  # gathered: one extra query per batch; availability: a constant
        if attribute.computed in _COUNTS:
            expression = _count(str(attribute.computed), tables)
        else:
            expression = getattr(tables[attribute.level], str(attribute.column))
        columns.append(expression.label(attribute.keyword))
    statement = (
        select(*columns)
        .select_from(_from(level))
        .where(_exists_visible(level, tables), *_conditions(query, tables, level))
        .order_by(entity.id)
    )
    if query.offset:
        statement = statement.offset(query.offset)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    return statement


def _gathered(session: Session, name: str, study_pks: list[int]) -> dict[int, list[str]]:
    """ModalitiesInStudy or SOPClassesInStudy of a batch of studies: the distinct values over each
    study's visible instances, sorted (one query, not one per study)."""
    instance, series = aliased(Instance), aliased(Series)
    column = series.modality if name == MODALITIES else instance.sop_class_uid
    rows = session.execute(
        select(series.study_pk, column)
        .distinct()
        .select_from(instance)
        .join(series, instance.series_pk == series.id)
        .where(series.study_pk.in_(study_pks), visible(instance), column.is_not(None), column != "")
        .order_by(series.study_pk, column)
    )
    found: dict[int, list[str]] = {}
    for study_pk, found_value in rows:
        found.setdefault(study_pk, []).append(str(found_value))
    return found


def _value(attribute: Attribute, raw: Any) -> Any:
    if raw is None or raw == "":
        return None
    if attribute.vr in ("IS", "US"):
        return int(raw)
    return raw


def _dataset(query: Query, row: Any, gathered: dict[str, dict[int, list[str]]]) -> Dataset:
    ds = Dataset()
    non_ascii = False
    mapping = row._mapping
    for attribute in query.returns:
        if attribute.level > query.level:
            continue
        if attribute.computed == AVAILABILITY:
            value: Any = "ONLINE"
        elif attribute.computed in _GATHERED:
            value = gathered[str(attribute.computed)].get(mapping["study_pk"]) or None
        else:
            value = _value(attribute, mapping[attribute.keyword])
        if isinstance(value, str):
            non_ascii |= not value.isascii()
        ds.add_new(attribute.tag, attribute.vr, value)
    for tag, vr in query.empty_returns:
        if tag not in ds:
            ds.add_new(tag, vr, [] if vr == "SQ" else None)
    if query.query_retrieve_level:
        ds.QueryRetrieveLevel = query.query_retrieve_level
    if non_ascii:
        ds.SpecificCharacterSet = UTF8
    return ds


def run_query(session: Session, query: Query, *, batch: int = 500) -> Iterator[Dataset]:
    """The matching entities of the query's level as Datasets holding the query's return keys, in
    primary key order (so limit/offset page deterministically).  Streams in batches."""
    statement = _statement(query)
    wanted = {str(a.computed) for a in query.returns if a.computed in _GATHERED and query.level >= Level.STUDY}
    result = session.execute(statement.execution_options(yield_per=batch))
    for rows in result.partitions():
        study_pks = sorted({r.study_pk for r in rows}) if wanted else []
        gathered = {name: _gathered(session, name, study_pks) for name in wanted}
        for row in rows:
            yield _dataset(query, row, gathered)


@dataclass(frozen=True)
class Page:
    datasets: list[Dataset]
    more: bool  # further results exist past this page


def search_page(session: Session, query: Query) -> Page:
    """One page (query.limit from query.offset), knowing whether more results follow."""
    if query.limit is None:
        return Page(list(run_query(session, query)), False)
    if query.limit == 0:
        probe = replace(query, limit=1)
        return Page([], next(iter(run_query(session, probe)), None) is not None)
    widened = replace(query, limit=query.limit + 1)
    datasets = list(run_query(session, widened))
    return Page(datasets[: query.limit], len(datasets) > query.limit)


def scope_exists(session: Session, scope: dict[str, str]) -> bool:
    """Whether the study (and series) a QIDO path names holds a visible instance."""
    if not scope:
        return True
    level = Level.SERIES if "SeriesInstanceUID" in scope else Level.STUDY
    query = Query(level, limit=1)
    for keyword, uid in scope.items():
        if not is_valid_uid(uid):
            return False
        query.matches.append(Match(BY_KEYWORD[keyword], (Term("eq", uid),)))
    return next(iter(run_query(session, query)), None) is not None


def matching_instances(session: Session, query: Query) -> list[Instance]:
    """The visible Instance rows under every entity the query matches (for C-MOVE and C-GET), in
    study, series number and instance number order.  Honours query.limit/offset when set."""
    tables = _tables(Level.IMAGE)
    statement = (
        select(Instance)
        .join(Series, Instance.series_pk == Series.id)
        .join(Study, Series.study_pk == Study.id)
        .join(Patient, Study.patient_pk == Patient.id)
        .where(visible(Instance), *_conditions(query, tables, Level.IMAGE))
        .order_by(
            Study.id,
            Series.series_number.asc().nulls_last(),
            Series.id,
            Instance.instance_number.asc().nulls_last(),
            Instance.id,
        )
    )
    if query.offset:
        statement = statement.offset(query.offset)
    if query.limit is not None:
        statement = statement.limit(query.limit)
    return list(session.scalars(statement))


__all__ = [
    "ATTRIBUTES",
    "DEFAULT_LIMIT",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "MAX_LIMIT",
    "MORE_RESULTS_WARNING",
    "UNABLE_TO_PROCESS",
    "Attribute",
    "Level",
    "Match",
    "Page",
    "Query",
    "QueryError",
    "Term",
    "like_pattern",
    "matching_instances",
    "parse_qido",
    "query_from_identifier",
    "run_query",
    "scope_exists",
    "search_page",
    "visible",
]
