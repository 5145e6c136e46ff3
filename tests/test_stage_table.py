"""The table of stages is the one place that says which stages exist, in which order, and what each starts from."""

from __future__ import annotations

import importlib
import typing

import pytest
from pydantic import BaseModel

from extrema import entry
from extrema.spec import STAGE_BY_NAME, STAGES, Experiment, Stage, StageName
from tests.stage_runs import TINY_EXPERIMENT


def test_the_table_agrees_with_the_spec_and_the_code() -> None:
    names = [s.name for s in STAGES]
    assert names == list(typing.get_args(StageName)) and len(set(names)) == len(names)
    assert STAGES[0].name == "pretrain" and STAGES[0].upstream is None
    for i, stage in enumerate(STAGES):
        field = Experiment.model_fields[stage.name].annotation
        assert isinstance(field, type) and issubclass(field, BaseModel), stage.name
        assert callable(importlib.import_module(stage.module).run), stage.module
        if stage.upstream is not None:
            assert stage.upstream in names[:i], f"{stage.name} starts from a later stage"


def test_what_a_stage_starts_from_follows_its_settings() -> None:
    exp = Experiment.model_validate(TINY_EXPERIMENT)
    assert exp.starts_from("pretrain") is None and exp.starts_from("knn") == "pretrain"
    given = exp.model_copy(update={"probe": exp.probe.model_copy(update={"checkpoint": "file:///w/ckpt"})})
    assert given.starts_from("probe") is None and given.starts_from("finetune") == "pretrain"
    scratch = exp.model_copy(update={"finetune": exp.finetune.model_copy(update={"init": "random"})})
    assert scratch.starts_from("finetune") is None


def test_the_job_entry_finds_a_stage_through_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new stage is a module and a row: the entry resolves it from the table and nothing else."""
    toy = Stage("toy", "tests.toy_stage")
    monkeypatch.setitem(STAGE_BY_NAME, "toy", toy)
    from tests import toy_stage

    assert entry.stage_fn("toy") is toy_stage.run
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        entry.stage_fn("nope")
