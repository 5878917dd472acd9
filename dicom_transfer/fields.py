"""`find --fields`: chosen C-FIND attributes as extra manifest columns.

A field is a DICOM keyword (`SliceThickness`) or a tag `(gggg,eeee)`; a private tag (odd
group) keeps `(gggg,eeee)` as its column header, which `--batch` accepts and ignores.
Values are written as the source answers them. Patient data (the Patient group 0010, any
person name) is refused unless `--show-phi`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, get_entry, keyword_dict

from .export import keyword_problem

_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_TOKEN = re.compile(r"\([^)]*\)|[^,]+")
_NOT_VALUES = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"})
PATIENT_GROUP = 0x0010


class FieldsError(ValueError):
    """`--fields` names something that cannot be a column; the message names the field."""


@dataclass(frozen=True)
class Field:
    """One chosen attribute: its column header, the C-FIND key, the answer key (`gggg,eeee`)."""

    header: str
    query_key: str
    tag: str  # lower-case `gggg,eeee`, how answers are looked up
    private: bool


def is_patient_data(tag: int) -> bool:
    """Whether a public tag holds patient data: the Patient group (0010) or a person's name."""
    if tag >> 16 == PATIENT_GROUP:
        return True
    try:
        return dictionary_VR(tag) == "PN"
    except KeyError:
        return False


def _keyword_field(name: str) -> tuple[Field, int]:
    problem = keyword_problem(name)
    if problem is not None:
        raise FieldsError(f"--fields: {problem}")
    tag = keyword_dict[name]
    return Field(name, name, f"{tag >> 16:04x},{tag & 0xFFFF:04x}", False), tag


def _tag_field(text: str) -> tuple[Field, int]:
    m = _TAG.fullmatch(text)
    if m is None:
        raise FieldsError(f"--fields: {text!r} is not a tag: write (gggg,eeee) with hexadecimal digits")
    group, element = int(m.group(1), 16), int(m.group(2), 16)
    tag = group << 16 | element
    header = f"({group:04X},{element:04X})"
    if group in (0x0000, 0x0002, 0xFFFE) or group < 0x0008:
        raise FieldsError(f"--fields: {header} is not a data element a C-FIND can ask for")
    if group % 2 == 1:
        return Field(header, f"{group:04x},{element:04x}", f"{group:04x},{element:04x}", True), tag
    try:
        vr = get_entry(tag)[0]
    except KeyError:
        raise FieldsError(f"--fields: {header} is not a known public tag") from None
    if vr in _NOT_VALUES:
        raise FieldsError(f"--fields: {header} holds a sequence or binary data ({vr}), not a value")
    return Field(header, f"{group:04x},{element:04x}", f"{group:04x},{element:04x}", False), tag


def parse_fields(text: str | None, *, show_phi: bool, skip: tuple[str, ...] = ()) -> tuple[Field, ...]:
    """`Keyword,(gggg,eeee),...` → fields, in order, once each; raises FieldsError naming the field.

    Fields whose value the manifest already has (`skip`, by keyword or tag) are left out.
    """
    if text is None:
        return ()
    skip_tags = {f"{keyword_dict[k] >> 16:04x},{keyword_dict[k] & 0xFFFF:04x}" for k in skip if k in keyword_dict}
    fields: list[Field] = []
    seen: set[str] = set()
    names = [token.strip() for token in _TOKEN.findall(text) if token.strip()]
    if not names:
        raise FieldsError("--fields: no field given (write e.g. --fields SliceThickness,(0020,1208))")
    for name in names:
        field, tag = _tag_field(name) if name.startswith("(") else _keyword_field(name)
        if not field.private and is_patient_data(tag) and not show_phi:
            raise FieldsError(f"--fields: {field.header} is patient data: it needs --show-phi")
        if field.tag in seen or field.tag in skip_tags:
            continue
        seen.add(field.tag)
        fields.append(field)
    return tuple(fields)
