"""The JSON contract: the shipped schemas are what the result classes make now, each is a valid
JSON Schema, and documents made by the code validate (real runs: tests/integration/test_json_contract.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest

from libvbackup import results, schemas


def test_shipped_schemas_are_generated_from_the_results():
    for name, schema in schemas.generate().items():
        assert schemas.load(name) == schema, f"libvbackup/schemas/{name}.json is stale: run scripts/schemas"
    shipped = {p.stem for p in schemas.HERE.glob("*.json")}
    assert shipped == set(schemas.generate())


@pytest.mark.parametrize("name", sorted(schemas.generate()))
def test_each_schema_is_valid(name):
    jsonschema.Draft202012Validator.check_schema(schemas.load(name))


def _validate(name: str, doc: dict) -> None:
    jsonschema.Draft202012Validator(schemas.load(name)).validate(doc)


def test_a_document_missing_a_field_or_of_another_version_is_refused():
    ev = {"format_version": 1, **results.ProgressEvent("vm1", "vda", "copy", 10, 20, 5, 2.0).to_dict()}
    _validate("progress", ev)
    for broken in ({**ev, "format_version": 2}, {k: v for k, v in ev.items() if k != "done"}, {**ev, "done": "10"}):
        with pytest.raises(jsonschema.ValidationError):
            _validate("progress", broken)
    _validate("progress", {**ev, "a_later_addition": True})  # additions are allowed


def test_an_error_under_json_is_a_document_with_the_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "list", "vm1", "--repo",
                        str(tmp_path / "none"), "--json"], capture_output=True, text=True)
    assert p.returncode == 5
    doc = json.loads(p.stdout)
    _validate("error", doc)
    assert doc["code"] == 5 and doc["type"] == "RepositoryError" and "does not exist" in doc["error"]
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("libvbackup: error: ")
    p = subprocess.run([sys.executable, "-m", "libvbackup.cli.main", "pull", "vm1", "--repo", str(tmp_path),
                        "--progress", "sideways", "--json"], capture_output=True, text=True)
    assert p.returncode == 2 and json.loads(p.stdout)["type"] == "UsageError"
