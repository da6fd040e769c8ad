"""The JSON contract: one JSON Schema (draft 2020-12) per ``--json`` document, shipped here.

``<command>.json`` describes what ``libvbackup <command> --json`` prints on success;
``error.json`` what it prints instead on failure; ``progress.json`` each line of
``--progress json``. Every document has ``format_version`` (``results.FORMAT_VERSION``).
Within a version fields are only added, never removed, renamed or retyped; objects may carry
fields a schema does not name yet, so a reader must ignore what it does not know.

The schemas are generated from the result dataclasses (``generate``; ``scripts/schemas``
writes them) so that they cannot drift from the code: a test compares the shipped files
with what ``generate`` makes now.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import re
import types
import typing

from .. import results as r

HERE = pathlib.Path(__file__).parent
BASE = "https://libvbackup.invalid/schemas/"

# command -> the result classes its --json prints (one of them)
COMMANDS: dict[str, tuple[type, ...]] = {
    "pull": (r.BackupResult,),
    "push": (r.BackupResult,),
    "list": (r.ListResult,),
    "restore": (r.RestoreResult, r.DefinedResult, r.InPlaceResult, r.InstantResult),
    "verify": (r.VerifyResult,),
    "prune": (r.PruneResult,),
    "checkpoints": (r.CheckpointsResult,),
    "status": (r.StatusResult,),
    "abort": (r.AbortResult,),
    "map": (r.MapResult,),
    "finalize": (r.FinalizeResult,),
    "copy": (r.CopyResult,),
    "files": (r.FilesResult,),
    "extract": (r.ExtractResult,),
}
if hasattr(r, "RunReport"):
    COMMANDS["run"] = (r.RunReport,)

VERSION = {"const": r.FORMAT_VERSION, "description": "the version of this contract"}

ERROR = {
    "type": "object",
    "description": "What any command prints on stdout instead of its result when it fails under --json "
                   "(the exit code is the same as without --json; stderr has the message as one line).",
    "required": ["format_version", "error", "code", "hint", "type"],
    "properties": {
        "format_version": VERSION,
        "error": {"type": "string", "description": "one line, for an administrator"},
        "code": {"type": "integer", "description": "the exit code (see libvbackup --help)"},
        "hint": {"type": ["string", "null"], "description": "what to do next, if libvbackup knows"},
        "type": {"type": "string", "description": "the error's class: UsageError, NotFound, StateError, ..."},
    },
}


def _comments(cls: type) -> dict[str, str]:
    """Field -> the comment on its line in the class's source (the field's documentation)."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _type(hint, defs: dict) -> dict:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None):
        return {"type": "null"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type(a, defs) for a in args]}
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is dict or origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _type(args[1], defs)
        return out
    if hint is list or origin in (list, tuple):
        return {"type": "array", "items": _type(args[0], defs)} if args else {"type": "array"}
    if dataclasses.is_dataclass(hint):
        _object(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    raise TypeError(f"no JSON type for {hint!r}")


def _object(cls: type, defs: dict) -> dict:
    if cls.__name__ in defs:
        return defs[cls.__name__]
    defs[cls.__name__] = {}  # (a placeholder while its fields are made)
    hints = typing.get_type_hints(cls)
    notes = _comments(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _type(hints[f.name], defs)
        if f.name in notes:
            prop = {**prop, "description": notes[f.name]}
        props[f.name] = prop
    doc = inspect.getdoc(cls) or ""
    schema = {"type": "object", "required": [f.name for f in dataclasses.fields(cls)], "properties": props}
    if doc and not doc.startswith(cls.__name__ + "("):  # (not the dataclass's made-up signature)
        schema = {"description": doc, **schema}
    defs[cls.__name__] = schema
    return schema


def _document(title: str, classes: tuple[type, ...], description: str) -> dict:
    defs: dict = {}
    for cls in classes:
        _object(cls, defs)
    top = [{"$ref": f"#/$defs/{c.__name__}"} for c in classes]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": BASE + f"{title}.json",
        "title": f"libvbackup {title} --json" if title not in ("error", "progress") else f"libvbackup {title}",
        "description": description,
        "type": "object",
        "required": ["format_version"],
        "properties": {"format_version": VERSION},
        **({"allOf": top} if len(top) == 1 else {"anyOf": top}),
        "$defs": defs,
    }


def generate() -> dict[str, dict]:
    """Every schema, by file stem."""
    out = {}
    for command, classes in COMMANDS.items():
        out[command] = _document(command, classes, f"What 'libvbackup {command} --json' prints on stdout "
                                                   f"when it succeeds.")
    out["error"] = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": BASE + "error.json",
                    "title": "libvbackup error", **ERROR}
    out["progress"] = _document("progress", (r.ProgressEvent,),
                                "One line of --progress json on stderr: one disk, about every second, "
                                "and once more at the end (phase done or failed).")
    return out


def load(name: str) -> dict:
    """A shipped schema: ``load("pull")``."""
    return json.loads((HERE / f"{name}.json").read_text())


def write(directory: pathlib.Path = HERE) -> list[pathlib.Path]:
    written = []
    for name, schema in generate().items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written
