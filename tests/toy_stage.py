"""A stage that does nothing, for the test that adds a stage through the table."""

from __future__ import annotations

from typing import Any


def run(spec: Any, stage_dir: str, attempt: Any = None) -> dict[str, Any]:
    """Report that it ran."""
    return {"ran": True}
