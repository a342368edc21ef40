"""JSON Schemas of the JSON luotrace writes (the recording's header, map
dumps and trailer; `report --json`, `compare --json`, `report --events`), and
the check every reader of a recording runs before using a part:
types, ranges that fit the kernel's integers, bounded sizes.  Kept as .json
files so that other tools can validate the same files.

Every `report` validates each part of every recording it reads, and map
dumps hold a row per file: jsonschema walks 100,000 nodes of a 1.5 MB
recording in ~0.7 s (a minute under the VM lane's emulation).  So the parts
of a recording are first checked by code compiled from the same schema
(fastjsonschema, ~25x faster); only a part that fails is walked again by
jsonschema, whose best_match says where and why in one line."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Optional

import fastjsonschema

DIR = os.path.dirname(os.path.abspath(__file__))
FILES = {"header": "recording-header.schema.json", "map dump": "recording-maps.schema.json",
         "trailer": "recording-trailer.schema.json",
         # what luotrace writes: report --json, compare --json, a line of report --events
         "report": "report.schema.json", "compare": "compare.schema.json", "event": "event.schema.json",
         "top": "top.schema.json"}
# Schemas written only with keywords fastjsonschema (drafts 4-7) knows, so its
# verdict is jsonschema's; report.schema.json uses prefixItems (2020-12).
FAST = frozenset({"header", "map dump", "trailer"})


@lru_cache(maxsize=None)
def schema(what: str) -> dict:
    with open(os.path.join(DIR, FILES[what])) as f:
        return json.load(f)


@lru_cache(maxsize=None)
def validator(what: str):
    from jsonschema import Draft202012Validator  # imported when a check fails or for outputs
    return Draft202012Validator(schema(what))


@lru_cache(maxsize=None)
def _fast(what: str):
    return fastjsonschema.compile(schema(what))


def _describe(err) -> Optional[str]:
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "top level"
    kind = {"type": "wrong type", "maximum": "number too large", "minimum": "number too small",
            "maxItems": "too many items", "maxProperties": "too many fields", "maxLength": "string too long",
            "required": "a field is missing", "enum": "unknown value", "const": "unexpected value",
            "pattern": "characters not allowed", "propertyNames": "bad field name"}.get(err.validator, err.validator)
    return f"{where}: {kind}"


def _best(what: str, obj: object, sub: Optional[dict] = None) -> Optional[str]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match
    v = validator(what) if sub is None else Draft202012Validator(sub)
    return _describe(best_match(v.iter_errors(obj)))


def problem(what: str, obj: object) -> Optional[str]:
    """None if OBJ is a valid WHAT, else one short line saying where and why."""
    if what in FAST:
        try:
            _fast(what)(obj)
            return None
        except fastjsonschema.JsonSchemaValueException as e:
            return _best(what, obj) or f"{e.name}: {e.message}"
    return _best(what, obj)


def labels_problem(labels: dict) -> Optional[str]:
    """The recording header's rule for --label (a Prometheus label name, a
    value of printable characters), checked when the labels are given."""
    return _best("header", labels, schema("header")["properties"]["labels"])
