"""JSON Schemas of the JSON luotrace writes (the recording's header, map
dumps and trailer; `report --json`, `compare --json`, `report --events`), and
the check every reader of a recording runs before using a part:
types, ranges that fit the kernel's integers, bounded sizes.  Kept as .json
files so that other tools can validate the same files."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Optional

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

DIR = os.path.dirname(os.path.abspath(__file__))
FILES = {"header": "recording-header.schema.json", "map dump": "recording-maps.schema.json",
         "trailer": "recording-trailer.schema.json",
         # what luotrace writes: report --json, compare --json, a line of report --events
         "report": "report.schema.json", "compare": "compare.schema.json", "event": "event.schema.json"}


@lru_cache(maxsize=None)
def validator(what: str) -> Draft202012Validator:
    with open(os.path.join(DIR, FILES[what])) as f:
        return Draft202012Validator(json.load(f))


def _describe(err) -> Optional[str]:
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "top level"
    kind = {"type": "wrong type", "maximum": "number too large", "minimum": "number too small",
            "maxItems": "too many items", "maxProperties": "too many fields", "maxLength": "string too long",
            "required": "a field is missing", "enum": "unknown value", "const": "unexpected value",
            "pattern": "characters not allowed", "propertyNames": "bad field name"}.get(err.validator, err.validator)
    return f"{where}: {kind}"


def problem(what: str, obj: object) -> Optional[str]:
    """None if OBJ is a valid WHAT, else one short line saying where and why."""
    return _describe(best_match(validator(what).iter_errors(obj)))


def labels_problem(labels: dict) -> Optional[str]:
    """The recording header's rule for --label (a Prometheus label name, a
    value of printable characters), checked when the labels are given."""
    sub = validator("header").schema["properties"]["labels"]
    return _describe(best_match(Draft202012Validator(sub).iter_errors(labels)))
