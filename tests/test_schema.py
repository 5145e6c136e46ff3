"""`extrema-launch schema`: every field of a sweep file with type, default and description; --json a JSON Schema of
the file with `base` typed as the Experiment."""

from __future__ import annotations

import contextlib
import io
import json

from launch.cli import main
from launch.sweepfile.schema import rows

# Fields still without a description (extrema/spec.py and the backends' settings): the lead adds them. A field added
# without one fails the test below; one given a description must leave this list.
KNOWN_MISSING: frozenset[str] = frozenset()  # every field of a sweep file is described


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_every_field_has_a_description() -> None:
    fields = rows()
    missing = {f.path for f in fields if not f.description}
    assert missing <= KNOWN_MISSING, sorted(missing - KNOWN_MISSING)
    assert not KNOWN_MISSING - missing, f"described now, remove from KNOWN_MISSING: {sorted(KNOWN_MISSING - missing)}"


def test_schema_lists_every_field_with_type_and_default() -> None:
    by_path = {f.path: f for f in rows()}
    for path in ("name", "base.pretrain.base_lr", "base.pretrain.masking.ratio", "launcher.resources.allow_idle_gpus"):
        assert path in by_path, path
    assert (by_path["launcher.resources.gpus_per_node"].type, by_path["launcher.resources.gpus_per_node"].default) == (
        "int",
        "0",
    )
    assert by_path["launcher.stages.<key>.nodes"].default == "1" and by_path["name"].default == "(required)"
    code, out, _ = cli("schema")
    assert code == 0 and "base.pretrain.base_lr" in out and "allow_idle_gpus" in out


def test_json_schema_types_base_as_the_experiment() -> None:
    code, out, err = cli("schema", "--json")
    doc = json.loads(out)
    assert code == 0 and err == ""
    assert doc["properties"]["base"] == {"$ref": "#/$defs/Experiment"}
    assert set(doc["required"]) == {"name", "base"}
    experiment = doc["$defs"]["Experiment"]
    assert {"model", "data", "stages", "pretrain", "knn"} <= set(experiment["properties"])
    assert doc["$defs"]["ResourcesSpec"]["properties"]["allow_idle_gpus"]["default"] is False
    assert "description" in doc["properties"]["launcher"]
