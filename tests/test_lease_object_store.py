"""The stage lease on a real S3 server (moto over HTTP, through s3fs): racing processes take turns with a bounded
number of PUTs, a takeover after expiry has one winner and fences the old owner, and `sweep` refuses a store that
ignores conditional writes. PUTs are counted from the server's access log."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3fs import S3FileSystem

from extrema.run import lease
from launch.cli import main
from tests.s3server import REPO, S3Server, isolated_aws_env, running_server

BUCKET = "leases"
RACERS = 6
TINY = REPO / "jobs" / "tiny.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto deciding one request at a time, as S3 decides each conditional write atomically."""
    with running_server(tmp_path_factory.mktemp("moto") / "serial.log", serial=True) as server:
        server.make_bucket(BUCKET)
        yield server


def use(server: S3Server, monkeypatch: pytest.MonkeyPatch, home: Path) -> str:
    """Point s3:// at `server` for this test (and the processes it forks); a fresh prefix of the bucket."""
    isolated_aws_env(monkeypatch, home)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    S3FileSystem.clear_instance_cache()
    return f"{BUCKET}/{uuid.uuid4().hex}"


def _take_turns(stage: str, barrier: Any, out: Any) -> None:
    barrier.wait()
    first = lease.try_acquire(stage)
    barrier.wait()  # every racer has looked before the first winner lets go
    mine = first if isinstance(first, lease.Lease) else lease.acquire(stage, wait=True, poll_s=0.1)
    assert isinstance(mine, lease.Lease)
    got_at = time.time()
    time.sleep(0.3)
    mine.fence("result")
    out.put((isinstance(first, lease.Lease), mine.generation, got_at, time.time()))
    mine.release("completed")


def collect(procs: list[Any], out: Any, deadline_s: float, done: Any = None) -> list[Any]:
    """What each process reported before the deadline; then `done` is set, and processes still running a while
    later are killed."""
    got: list[Any] = []
    end = time.monotonic() + deadline_s
    try:
        while len(got) < len(procs) and time.monotonic() < end:
            try:
                got.append(out.get(timeout=0.2))
            except Exception:
                continue
    finally:
        if done is not None:
            done.set()
            end = time.monotonic() + 5
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    return got


def test_racing_processes_take_turns_with_a_bounded_number_of_puts(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefix = use(store, monkeypatch, tmp_path)
    stage = f"s3://{prefix}/run/pretrain"
    earlier = lease.try_acquire(stage)  # a generation from an earlier attempt is there: the case that spun
    assert isinstance(earlier, lease.Lease)
    earlier.release("failed")
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_take_turns, args=(stage, barrier, out)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    got = collect(procs, out, deadline_s=20)
    puts = store.requests("PUT", f"/{prefix}/")
    assert len(got) == RACERS, (
        f"{len(got)} of {RACERS} racers got the stage; {len(puts)} PUTs: {puts.count(412)} refused"
    )
    assert sum(first for first, *_ in got) == 1  # one winner; the others waited
    assert sorted(gen for _, gen, *_ in got) == list(range(2, 2 + RACERS))
    turns = sorted((start, end) for *_, start, end in got)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(turns)), turns  # never two at once
    # generation 1's create and release; each turn's release, and one create by each waiter that saw the stage
    # free (one of them wins): at most RACERS + (RACERS - 1) + ... + 1 creates
    assert 2 * RACERS + 2 <= len(puts) <= 2 + RACERS + RACERS * (RACERS + 1) // 2, puts
    print(f"{len(puts)} PUTs ({puts.count(412)} refused) for {RACERS} racers taking turns")


def _race(stage: str, barrier: Any, out: Any, done: Any) -> None:
    barrier.wait()
    got = lease.try_acquire(stage)
    out.put((os.getpid(), isinstance(got, lease.Lease), got.generation))
    done.wait(30)  # stay alive, the lease live, until every racer has looked


def test_a_takeover_race_after_expiry_has_one_winner_and_the_old_owner_is_fenced(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefix = use(store, monkeypatch, tmp_path)
    stage = f"s3://{prefix}/run/pretrain"
    old = lease.try_acquire(stage)
    assert isinstance(old, lease.Lease)
    an_hour_ago = time.time() - 3600
    with monkeypatch.context() as frozen:  # its last heartbeat got through an hour ago
        frozen.setattr(time, "time", lambda: an_hour_ago)
        old.renew()
    old.check_superseded()  # its record is still its own
    before = len(store.requests("PUT", f"/{prefix}/"))
    ctx = mp.get_context("fork")
    barrier, out, done = ctx.Barrier(RACERS), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(stage, barrier, out, done)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    got = collect(procs, out, 20, done)
    puts = store.requests("PUT", f"/{prefix}/")[before:]
    assert len(got) == RACERS, f"{len(got)} of {RACERS} racers answered; {len(puts)} PUTs: {puts.count(412)} refused"
    winners = [g for g in got if g[1]]
    assert len(winners) == 1 and winners[0][2] == 2, got
    assert {gen for *_, gen in got} == {2}  # the losers name the winner's generation
    assert len(puts) <= 3 * RACERS, puts  # a mark and a create each, at most, and a few retries
    with pytest.raises(lease.LeaseLost, match="taken over"):
        old.renew()
    with pytest.raises(lease.LeaseLost):
        old.fence("checkpoint")
    holder = lease.read_holder(stage, 1)
    assert holder.record["taken_over_by"] == 2 and holder.record["heartbeat_at"] == an_hour_ago
    print(f"{len(puts)} PUTs ({puts.count(412)} refused) for {RACERS} racers taking over")


def test_a_renewal_after_a_takeover_is_lost_even_before_the_next_generation_is_listed(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A taker marks the record it judged free on that record's ETag before it creates the next generation: the
    owner's next renewal fails at once; a record renewed since its taker read it is not taken over."""
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "1")
    stage = f"s3://{use(store, monkeypatch, tmp_path)}/run/pretrain"
    mine = lease.try_acquire(stage)
    assert isinstance(mine, lease.Lease)
    time.sleep(1.2)  # past the TTL: free to take over
    seen = lease.current(stage)
    assert seen is not None and "s old" in (seen.why_free() or "")
    mine.renew()  # renewed after the taker read it
    assert not lease._mark_taken_over(seen, 2)
    time.sleep(1.2)
    seen = lease.current(stage)
    assert seen is not None and lease._mark_taken_over(seen, 2)  # a taker that stops before creating generation 2
    assert lease.generations(stage) == [1]
    with pytest.raises(lease.LeaseLost, match="taken over"):
        mine.renew()
    again = lease.try_acquire(stage)
    assert isinstance(again, lease.Lease) and again.generation == 2
    again.renew()
    again.fence("result")


def test_the_probe_passes_a_store_with_conditional_writes_and_leaves_nothing(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prefix = use(store, monkeypatch, tmp_path)
    assert lease.probe_conditional_writes(f"s3://{prefix}/runs") is None
    assert S3FileSystem().find(prefix) == []
    assert lease.probe_conditional_writes(f"memory://{prefix}") is None


def test_sweep_refuses_a_store_that_ignores_conditional_writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with running_server(tmp_path / "ignoring.log", conditions=False) as ignoring:
        ignoring.make_bucket(BUCKET)
        prefix = use(ignoring, monkeypatch, tmp_path)
        why = lease.probe_conditional_writes(f"s3://{prefix}")
        assert why is not None and "both succeeded" in why
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["sweep", str(TINY), "--root", f"s3://{prefix}/runs", "--snapshot", "off"])
        files = S3FileSystem().find(prefix)
    assert code == 2, out.getvalue() + err.getvalue()
    refusal = err.getvalue().strip()
    assert "\n" not in refusal and "cannot hold stage leases" in refusal and "both succeeded" in refusal, refusal
    assert not [f for f in files if f.endswith(("spec.json", "status.json"))], files
    assert not [f for f in files if "probe" in f], files


def test_a_record_replaced_while_it_is_read_is_read_again(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another host rewrites a shared record (a sweep's manifest) between this host's open and its read: the read is
    made again and returns the new version, instead of the store's "no longer exists" failing the command."""
    from extrema.run import contract, rundir

    url = f"s3://{use(store, monkeypatch, tmp_path)}/manifest.json"
    rundir.write_json(url, {"version": 1})
    fs, path = rundir.filesystem(url)
    replaced: list[int] = []

    def replace_once_then_read(f: Any) -> bytes:
        if not replaced:
            replaced.append(1)
            rundir.write_json(url, {"version": 2, "from": "the other host"})
        data: bytes = f.read()
        return data

    assert json.loads(rundir.read_stable(fs, path, "rb", replace_once_then_read)) == {
        "version": 2,
        "from": "the other host",
    }
    assert replaced == [1]

    def always_replaced(f: Any) -> bytes:
        rundir.write_json(url, {"version": time.time_ns()})
        data: bytes = f.read()
        return data

    with pytest.raises(OSError, match="no longer exists"):  # a writer that never stops: the error stands, bounded
        rundir.read_stable(fs, path, "rb", always_replaced)
    assert contract.read_record(url) is not None and rundir.read_json(url) is not None


def test_every_reader_of_shared_objects_reads_one_replaced_after_its_open_again(
    store: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each reader of an object another host may rewrite (a code snapshot's manifest, which two sweeps started
    together both write; its files; a torch record; a weights file; a safetensors header; a log the running attempt
    uploads again) opens again when the object is replaced between its open and its read, and returns the new version.
    The replacement is made by a real write to the S3 server right after the reader's open."""
    import hashlib

    import torch
    from safetensors.torch import save as safetensors_bytes

    from extrema.run import code_snapshot, rundir
    from extrema.train import ckpt, export_description, weights
    from launch.backends import log_source
    from launch.runstore import snapshot as snapshots

    base = f"s3://{use(store, monkeypatch, tmp_path)}/replaced"
    fs, _ = rundir.filesystem(base)
    after_open: dict[str, bytes] = {}  # path -> what "the other host" writes there right after this host's next open
    plain_open = S3FileSystem.open

    def open_then_replaced(self: S3FileSystem, path: str, mode: str = "rb", **kw: Any) -> Any:
        f = plain_open(self, path, mode, **kw)
        key = self._strip_protocol(path)
        if "r" in mode and key in after_open:
            with plain_open(self, path, "wb") as w:
                w.write(after_open.pop(key))
        return f

    monkeypatch.setattr(S3FileSystem, "open", open_then_replaced)

    def replaced(url: str, first: bytes, then: bytes) -> None:
        with plain_open(fs, rundir.filesystem(url)[1], "wb") as w:
            w.write(first)
        after_open[rundir.filesystem(url)[1]] = then

    # a code snapshot saved by two hosts: the same files, manifests that name each host's checkout
    files = {"extrema/__init__.py": b"# one\n", "launch/__init__.py": b"# two\n"}
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    mine = snapshots.Snapshot(files, None, (), "/n1/src", digests)
    code = snapshots.save(mine, base)
    manifest_url = rundir.join(code, code_snapshot.MANIFEST)
    theirs = dict(rundir.read_json(manifest_url))
    theirs["source"] = "/n2/src"
    replaced(manifest_url, json.dumps(rundir.read_json(manifest_url)).encode(), json.dumps(theirs).encode())
    assert code_snapshot.read_manifest(manifest_url)["source"] == "/n2/src"
    replaced(rundir.join(code, code_snapshot.FILES, "launch/__init__.py"), b"# two\n", b"# two\n")
    after_open[rundir.filesystem(manifest_url)[1]] = json.dumps(theirs).encode()
    copy = snapshots.local_copy(code, tmp_path / "code-cache")
    assert (copy / "launch" / "__init__.py").read_bytes() == b"# two\n" and not after_open

    def torch_bytes(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    record = f"{base}/record.pt"
    replaced(record, torch_bytes({"v": torch.tensor(1)}), torch_bytes({"v": torch.tensor(2)}))
    assert int(ckpt.read_torch(record)["v"]) == 2

    pth = f"{base}/weights.pth"
    replaced(pth, torch_bytes({"w": torch.zeros(2)}), torch_bytes({"w": torch.ones(2)}))
    assert weights.read_pth(pth)["w"].tolist() == [1.0, 1.0]

    st = f"{base}/weights.safetensors"
    old = safetensors_bytes({"w": torch.zeros(2)}, metadata={"by": "n1"})
    replaced(st, old, safetensors_bytes({"w": torch.ones(2)}, metadata={"by": "n2"}))
    assert export_description.safetensors_header_metadata(st) == {"by": "n2"}

    log = f"{base}/attempt.log"
    replaced(log, b"step 1\n", b"step 1\nstep 2\n")
    assert log_source.file_source(log).read(0) == b"step 1\nstep 2\n"
    assert not after_open  # every replacement was made, so every reader met one
