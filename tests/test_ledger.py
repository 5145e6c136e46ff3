"""The ledger of completed stages: `status` and `results` of a finished sweep on an S3 server read a few ledger
files instead of three records a stage, show the same table, and read every stage the ledger cannot vouch for
(in flight, never ledgered, or held by a damaged part) from its own records."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from extrema.run import rundir
from extrema.run.contract import update_status
from launch.addressed import open_addressed
from launch.runstore import ledger, stage_records, store
from launch.views.results_view import collect
from launch.views.status_view import status_table
from tests.s3server import S3Server, isolated_aws_env, running_server
from tests.test_records_shape import finished

BUCKET = "ledger"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_server(tmp_path_factory.mktemp("moto") / "server.log") as s3:
        s3.make_bucket(BUCKET)
        yield s3


@pytest.fixture
def sweep(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The tiny sweep, finished, on the S3 server (a fresh prefix); its URL."""
    isolated_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    S3FileSystem.clear_instance_cache()
    return finished(f"s3://{BUCKET}/{uuid.uuid4().hex}")  # type: ignore[arg-type]


def server_lines(server: S3Server) -> list[str]:
    assert server.log is not None
    return server.log.read_text(errors="replace").splitlines()


def test_a_finished_sweep_is_read_from_the_ledger_the_second_time(server: S3Server, sweep: str) -> None:
    direct = collect(open_addressed(sweep), write=False)[0]  # every record read, nothing written
    assert ledger.part_names(sweep) == []
    first = status_table(open_addressed(sweep))  # reads every record, then ledgers the completed stages
    assert len(ledger.read(sweep)) == len(first.keys) and ledger.part_names(sweep)
    before = len(server_lines(server))
    second = status_table(open_addressed(sweep))
    table = collect(open_addressed(sweep))[0]
    after = server_lines(server)[before:]
    names = ("status.json", "result.json", "provenance.json")
    assert [r for r in after if "GET " in r and any(f"/{n} HTTP" in r for n in names)] == []  # all from the ledger
    assert second.rows == first.rows and table.equals(direct)
    assert stage_records.read(sweep, first.keys).ledgered == len(first.keys)


def test_stages_the_ledger_cannot_vouch_for_are_read_from_their_records(sweep: str) -> None:
    target = open_addressed(sweep)
    keys = status_table(target).keys
    running = keys[0]
    update_status(store.stage_url(sweep, *store.split_key(running)), state="running", finished_at=None)
    # a part whose entries are not what the ledger holds: a running state, a wrong type, a damaged status
    bad = {"entries": {keys[1]: {"status": {"state": "running"}, "result": {}, "provenance": {}},
                       keys[2]: {"status": {"state": "completed", "attempts": "three"}, "result": {}, "provenance": {}},
                       "not a key": {"status": {"state": "completed"}, "result": {}, "provenance": {}}}}  # fmt: skip
    rundir.write_json(rundir.join(sweep, ledger.FOLDER, "000100-" + "0" * 16 + ".json"), bad)
    rundir.write_text_atomic(rundir.join(sweep, ledger.FOLDER, "000101-" + "1" * 16 + ".json"), "{not json")
    assert ledger.valid_entries(bad["entries"]) == {}
    read = stage_records.read(sweep, keys, write=False)
    assert read.statuses[running]["state"] == "completed"  # ledgered when it completed: a completed stage is final
    assert read.ledgered == len(keys)  # the bad parts changed nothing
    # ... until a reader is told the stage was reset (status --fresh): the ledger is set right for everyone
    fresh = stage_records.read(sweep, keys, fresh=True)
    assert fresh.statuses[running]["state"] == "running" and fresh.ledgered == 0
    after = stage_records.read(sweep, keys)
    assert after.statuses[running]["state"] == "running" and after.ledgered == len(keys) - 1
    update_status(store.stage_url(sweep, *store.split_key(running)), state="completed", finished_at=2e9)
    assert stage_records.read(sweep, keys).added == 1 and stage_records.read(sweep, keys).ledgered == len(keys)


def test_a_read_only_reader_adds_nothing_and_reads_every_record(sweep: str) -> None:
    keys = [k for r in open_addressed(sweep).runs for k in r.job_keys()]
    read = stage_records.read(sweep, keys, write=False)
    assert read.ledgered == 0 and read.added == 0 and ledger.part_names(sweep) == []
    assert all(read.results[k] for k in keys) and all(read.provenances[k] for k in keys)
    again = stage_records.read(sweep, keys)
    assert again.added == len(keys) and stage_records.read(sweep, keys).ledgered == len(keys)


def test_a_stage_removed_to_run_again_is_no_longer_vouched_for_once_sweep_sees_it(tmp_path: Path) -> None:
    import shutil

    from launch.cli.sweep import unvouch

    url = finished(tmp_path / "runs")
    keys = status_table(open_addressed(url)).keys  # ledgers every stage
    gone = keys[-1]
    shutil.rmtree(store.stage_url(url, *store.split_key(gone)))
    assert stage_records.read(url, keys).statuses[gone]["state"] == "completed"  # the ledger's word, until...
    unvouch(url, store.read_statuses(url, keys))  # ... sweep reads every status before it plans
    view = status_table(open_addressed(url))
    assert {k: r for k, r in zip(view.keys, view.rows)}[gone][view.columns.index("state")] != "completed"
    assert stage_records.read(url, keys).ledgered == len(keys) - 1
