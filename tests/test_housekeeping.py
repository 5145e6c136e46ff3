"""Housekeeping of a run store, on a local path, in memory and on S3 (the moto server): `du` sums every file's
bytes by run, stage and kind from one listing; `gc` lists exactly the checkpoints of completed stages beyond their
retention, removes them only with --yes and keeps the newest step that downstream stages read; `rm` removes whole
runs once confirmed, so that neither the manifest nor the ledger shows them again. Neither touches a stage a live
attempt holds, nor a store mounted read-only, nor anything a link leads to outside the store."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import uuid
from pathlib import Path

import fsspec
import pytest

from extrema.run import checkpoint_dirs, lease, rundir
from extrema.run.contract import update_status
from launch.runstore import checkpoint_gc, disk_usage, ledger, store
from launch.sweepfile.expand import load_runs
from tests import test_snapshot_verify
from tests.s3server import S3Server, isolated_aws_env, s3_server  # noqa: F401  (fixture)
from tests.test_cli import TINY, cli
from tests.test_readonly_store import launch, read_only, snapshot
from tests.test_records_shape import finished as records_finished

STEPS = (2, 4, 6)  # complete pretrain steps of every run; tiny.yaml keeps the last 2 (keep_last's default)
INCOMPLETE = 8  # a pretrain step without .metadata
store_root = test_snapshot_verify.store_root  # the fixture: a root on file://, memory:// and the moto server's s3://


def put(url: str, data: bytes) -> None:
    fs, path = rundir.filesystem(url)
    if "://" not in url or url.startswith("file://"):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def finished(root: str) -> tuple[str, list[str]]:
    """The tiny sweep finished under `root` (records written directly, no stage runs: `test_records_shape`), with
    specs, checkpoint-like step folders, logs and exported encoders in each pretrain stage; its URL and run ids."""
    url = records_finished(root)
    sweep, runs = load_runs(TINY, root=root)
    for r in runs:
        for s in r.stages:
            store.write_spec(store.stage_url(url, r.run_id, s), r.spec(sweep.name, s))
        pretrain = store.stage_url(url, r.run_id, "pretrain")
        for step in STEPS:
            put(f"{pretrain}/ckpt/step-{step}/__0_0.distcp", b"w" * (1000 * step))
            put(f"{pretrain}/ckpt/step-{step}/.metadata", b"m" * 10)
        put(f"{pretrain}/ckpt/step-{INCOMPLETE}/__0_0.distcp", b"p" * 77)
        put(f"{pretrain}/ckpt/corrupt/step-1-1700000000/__0_0.distcp", b"c" * 33)
        put(f"{pretrain}/export/encoder_ema.pt", b"e" * 500)
        put(f"{pretrain}/logs/local.1.log", b"hello\n" * 10)
    return url, [r.run_id for r in runs]


def sizes(url: str) -> dict[str, int]:
    """Every file below `url` (path below it -> bytes), listed independently of the code under test."""
    fs, path = rundir.filesystem(url)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)
    base = str(path).rstrip("/") + "/"
    return {p[len(base) :]: int(i["size"]) for p, i in found.items()}


def du_json(*args: str) -> dict:
    code, out, err = cli("du", *args, "--json")
    assert code == 0, out + err
    return json.loads(out)


def steps_left(url: str, run_id: str) -> set[str]:
    return {p.split("/")[3] for p in sizes(url) if p.startswith(f"{run_id}/pretrain/ckpt/")}


def test_du_totals_equal_the_files_sizes(store_root: str) -> None:
    url, ids = finished(store_root)
    files = sizes(url)
    got = du_json(url)
    assert got["total"]["total"] == sum(files.values()) and got["total"]["files"] == len(files)
    assert got["runs"] == 2
    rows = {(r["run"], r["stage"]): r for r in got["rows"]}
    pretrain = rows[(ids[0], "pretrain")]
    ckpt = sum(n for p, n in files.items() if p.startswith(f"{ids[0]}/pretrain/ckpt/"))
    assert pretrain["checkpoints"] == ckpt == 1000 * sum(STEPS) + 10 * len(STEPS) + 77 + 33
    assert pretrain["logs"] == 60
    assert pretrain["other"] == sum(n for p, n in files.items() if p.startswith(f"{ids[0]}/pretrain/")) - ckpt - 60
    assert rows[("(sweep)", "manifest")]["other"] == sum(n for p, n in files.items() if p.startswith("manifest"))
    assert sum(r["total"] for r in got["rows"]) == got["total"]["total"]

    root = du_json(store_root)  # the root: one row per sweep, the same bytes
    assert [s["sweep"] for s in root["sweeps"]] == ["tiny"] and root["total"] == got["total"]

    code, out, _ = cli("du", url)  # the table: every run and stage, and the total in binary units
    assert code == 0 and ids[0] in out and "total" in out and "KiB" in out, out


def test_du_lists_an_object_store_in_a_few_requests(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120 more files cost no more requests: one recursive listing, not a request per file."""
    server: S3Server = request.getfixturevalue("s3_server")
    isolated_aws_env(monkeypatch, tmp_path)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})
    bucket = f"hk-{uuid.uuid4().hex[:8]}"
    server.make_bucket(bucket)
    url, ids = finished(f"s3://{bucket}/runs")
    fs, path = rundir.filesystem(f"{url}/{ids[0]}/pretrain/ckpt/step-6")
    fs.pipe({f"{path}/__{i}_0.distcp": b"s" * 3 for i in range(120)})  # concurrent puts

    def requests() -> int:
        return sum(len(server.requests(m, f"/{bucket}")) for m in ("GET", "HEAD"))

    before = requests()
    got = du_json(url)
    assert got["total"]["total"] == sum(sizes(url).values())
    assert requests() - before <= 8, requests() - before


def test_gc_dry_run_lists_exactly_the_steps_beyond_retention(store_root: str) -> None:
    url, ids = finished(store_root)
    before = sizes(url)
    code, out, err = cli("gc", url)
    assert code == 0, out + err
    assert sizes(url) == before  # nothing removed, nothing written (no lease taken)
    cells = [[c.strip() for c in line.split("│")] for line in out.splitlines() if "ckpt/" in line]
    listed = {(c[1], c[3]) for c in cells}
    assert listed == {(i, f"ckpt/step-{s}") for i in ids for s in (2, INCOMPLETE)}, out
    assert "dry run, nothing removed: --yes removes 4 folder(s)" in out

    plan = checkpoint_gc.plan(url, disk_usage.listed(url), corrupt=True)
    folders = {f.path for r in plan.removals for f in r.folders}
    assert folders == {
        f"{i}/pretrain/ckpt/{name}"
        for i in ids
        for name in ("step-2", f"step-{INCOMPLETE}", "corrupt/step-1-1700000000")
    }
    assert plan.size == sum(n for p, n in before.items() if any(p.startswith(f + "/") for f in folders))


def test_gc_yes_removes_them_and_keeps_what_downstream_reads(store_root: str) -> None:
    url, ids = finished(store_root)
    before = sizes(url)
    doomed = {p for p in before if "/ckpt/step-2/" in p or f"/ckpt/step-{INCOMPLETE}/" in p}
    code, out, err = cli("gc", url, "--yes")
    assert code == 0, out + err
    after = sizes(url)
    assert not doomed & set(after)
    assert {p for p in before if p not in doomed} <= set(after)  # everything else is still there
    for run_id in ids:
        assert steps_left(url, run_id) == {"step-4", "step-6", "corrupt"}
        assert f"{run_id}/pretrain/ckpt/step-6/.metadata" in after  # the newest complete step: what knn reads
        assert f"{run_id}/pretrain/export/encoder_ema.pt" in after
    assert du_json(url)["total"]["total"] == sum(before.values()) - sum(before[p] for p in doomed) + sum(
        n for p, n in after.items() if "/lease/" in p
    )
    code, out, _ = cli("gc", url)
    assert code == 0 and "no checkpoint beyond its stage's retention" in out, out


def test_retention_keeps_the_newest_and_multiples_of_keep_every() -> None:
    assert checkpoint_dirs.beyond_retention([2, 4, 6, 8], keep_last=2) == [2, 4]
    assert checkpoint_dirs.beyond_retention([2, 4, 6, 8], keep_last=1, keep_every=4) == [2, 6]
    assert checkpoint_dirs.beyond_retention([3], keep_last=0) == []  # the newest step is never beyond


def test_gc_leaves_stages_that_are_live_or_not_completed(store_root: str) -> None:
    url, ids = finished(store_root)
    held = lease.try_acquire(store.stage_url(url, ids[0], "pretrain"))
    assert isinstance(held, lease.Lease)
    update_status(store.stage_url(url, ids[1], "pretrain"), state="running")
    code, out, err = cli("gc", url, "--yes")
    assert code == 0, out + err
    assert f"{ids[0]}/pretrain: left as it is: held by a live attempt (generation 1: pid {os.getpid()}" in out
    assert f"{ids[1]}/pretrain: left as it is: running: only completed stages are collected" in out
    for run_id in ids:
        assert steps_left(url, run_id) == {"step-2", "step-4", "step-6", f"step-{INCOMPLETE}", "corrupt"}
    held.release("done")


def test_gc_rechecks_the_lease_right_before_removing(store_root: str) -> None:
    """A plan made while the stage was free is not carried out once an attempt has taken it."""
    url, ids = finished(store_root)
    plan = checkpoint_gc.plan(url, disk_usage.listed(url))
    mine = next(r for r in plan.removals if r.key == f"{ids[0]}/pretrain")
    held = lease.try_acquire(store.stage_url(url, ids[0], "pretrain"))
    assert isinstance(held, lease.Lease)
    with pytest.raises(checkpoint_gc.Held, match="held by a live attempt"):
        checkpoint_gc.remove(url, mine)
    assert "step-2" in steps_left(url, ids[0])
    held.release("done")


def ledgered(url: str) -> set[str]:
    return set(ledger.read(url, store.real_tree(url)))


def test_rm_removes_a_run_from_the_store_the_manifest_and_the_ledger(store_root: str) -> None:
    url, ids = finished(store_root)
    assert cli("status", url)[0] == 0  # reads the completed stages into the ledger
    assert f"{ids[0]}/pretrain" in ledgered(url)
    code, out, err = cli("rm", url, "--run", ids[0][:4], "--yes")
    assert code == 0, out + err
    assert "removed 1 run(s)" in out and ids[0] in out
    assert not any(p.startswith(ids[0] + "/") for p in sizes(url))
    assert ids[0] not in ledgered(url) and not any(k.startswith(ids[0]) for k in ledgered(url))
    assert [r.run_id for r in store.stored_runs_of(url, store.read_manifest(url) or {})] == [ids[1]]

    code, out, _ = cli("status", url, "--json")
    assert code == 0 and {r["run"] for r in json.loads(out)} == {ids[1]}, out
    code, out, _ = cli("status", str(TINY), "--root", store_root, "--json")  # the file still defines the run
    states = {(r["run"], r["stage"]): r["state"] for r in json.loads(out)}
    assert states[(ids[0], "pretrain")] == "-" and states[(ids[1], "pretrain")] == "completed", out
    code, out, _ = cli("results", url, "--format", "json")
    assert code == 0 and {r["run_id"] for r in json.loads(out)} == {ids[1]}


def test_rm_needs_a_typed_yes_or_yes_without_a_terminal(store_root: str) -> None:
    url, ids = finished(store_root)
    before = sizes(url)
    code, out, err = cli("rm", url, "--run", ids[0])
    assert code == 2 and "no terminal to confirm on; give --yes" in err, out + err
    assert len(err.strip().splitlines()) == 1
    assert sizes(url) == before


def test_rm_refuses_a_run_with_a_live_stage(store_root: str) -> None:
    url, ids = finished(store_root)
    stage = store.stage_url(url, ids[0], "knn")
    held = lease.try_acquire(stage)
    assert isinstance(held, lease.Lease)
    before = sizes(url)
    code, out, err = cli("rm", url, "--run", ids[0], "--yes")
    assert code == 2 and err.count("\n") == 1, out + err
    assert f"{stage}: held by a live attempt (generation 1: pid {os.getpid()}" in err.replace("\n", "")
    assert sizes(url) == before
    held.release("done")

    update_status(stage, state="pending", job_id="12345", backend="slurm")  # queued: it would start later
    code, out, err = cli("rm", url, "--run", ids[0], "--yes")
    assert code == 2 and "pending (slurm job 12345); cancel it first" in err.replace("\n", ""), out + err


def test_rm_names_unknown_runs(tmp_path: Path) -> None:
    url, _ = finished(str(tmp_path / "runs"))
    code, _, err = cli("rm", url, "--run", "", "--yes")
    assert code == 2 and "is not part of" in err
    code, _, err = cli("rm", url, "--run", "zzz", "--yes")
    assert code == 2 and "run 'zzz' is not part of" in err


def test_rm_finishes_a_removal_cut_short(tmp_path: Path) -> None:
    """The run's folder gone but the manifest still listing it (interrupted): rm again finishes; a folder the
    manifest no longer lists (the other way round) is found by its records."""
    url, ids = finished(str(tmp_path / "runs"))
    store.write_manifest(url, {"runs": []})
    rundir.filesystem(url)[0].rm(store.run_url(url, ids[0]), recursive=True)
    assert cli("rm", url, "--run", ids[0], "--yes")[0] == 0
    assert [r.run_id for r in store.stored_runs_of(url, store.read_manifest(url) or {})] == [ids[1]]


def test_links_out_of_the_store_are_neither_counted_nor_followed(tmp_path: Path) -> None:
    url, ids = finished(str(tmp_path / "runs"))
    outside = tmp_path / "precious"
    (outside / "step-3").mkdir(parents=True)
    (outside / "step-3" / "__0_0.distcp").write_bytes(b"z" * 100_000)
    (outside / "step-3" / ".metadata").write_bytes(b"m")
    step = Path(url) / ids[0] / "pretrain" / "ckpt" / "step-3"
    step.symlink_to(outside / "step-3")
    got = du_json(url)
    assert got["total"]["total"] < 100_000  # the link counts as itself
    (outside / "run").mkdir()
    (outside / "run" / "keep.txt").write_text("mine")
    Path(url, "linked").symlink_to(outside / "run")
    code, out, err = cli("gc", url, "--yes")
    assert code == 0, out + err
    assert (outside / "step-3" / "__0_0.distcp").stat().st_size == 100_000
    assert cli("rm", url, "--run", ids[0], "--yes")[0] == 0
    assert (outside / "step-3" / "__0_0.distcp").exists() and (outside / "run" / "keep.txt").exists()


def test_read_only_store(tmp_path: Path) -> None:
    """On a store mounted read-only: du and a gc dry run work; gc --yes and rm refuse in one line naming the path."""
    root = tmp_path / "runs"
    url, ids = finished(str(root))
    before = snapshot(root)
    code, out = read_only(root, *launch("du", url))
    assert code == 0 and "total" in out, out
    code, out = read_only(root, *launch("gc", url))
    assert code == 0 and "dry run, nothing removed" in out, out
    for args in (("gc", url, "--yes"), ("rm", url, "--run", ids[0], "--yes")):
        code, out = read_only(root, *launch(*args))
        assert code == 2 and "Traceback" not in out, out
        assert out.strip().replace("\n", "").endswith("is not writable (read-only filesystem or no permission)"), out
        assert url in out.replace("\n", ""), out
    assert snapshot(root) == before


@pytest.mark.parametrize("command", ["du", "gc", "rm"])
def test_help_and_usage_errors(command: str, tmp_path: Path) -> None:
    code, out, _ = cli(command, "--help")
    assert code == 0 and "usage: extrema-launch" in out and "Exit codes" in out
    nothing = f"file://{tmp_path}/nothing"
    code, _, err = cli(command, nothing, *(["--run", "x"] if command == "rm" else []))
    assert code == 2 and err.replace("\n", "").endswith(
        "neither a sweep nor a root holding sweeps (nothing is stored there)"
    )
    assert nothing in err.replace("\n", "")


def test_rm_takes_a_sweep_not_a_root(tmp_path: Path) -> None:
    url, ids = finished(str(tmp_path / "runs"))
    code, _, err = cli("rm", str(tmp_path / "runs"), "--run", ids[0], "--yes")
    assert code == 2 and "a root holding 1 sweep(s); name one" in err
    assert Path(url, ids[0]).is_dir()


def on_a_terminal(answer: str, *args: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its standard input, typing `answer`: (exit code, what it printed)."""
    main, side = pty.openpty()
    proc = subprocess.Popen(launch(*args), stdin=side, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.close(side)
    os.write(main, answer.encode() + b"\n")
    out, _ = proc.communicate(timeout=120)
    os.close(main)
    return proc.returncode, out.decode()


def test_rm_on_a_terminal_removes_only_after_a_typed_yes(tmp_path: Path) -> None:
    url, ids = finished(str(tmp_path / "runs"))
    code, out = on_a_terminal("y", "rm", url, "--run", ids[0])
    assert code == 1 and "type yes to confirm" in out and "nothing removed" in out, out
    assert Path(url, ids[0]).is_dir()
    code, out = on_a_terminal("yes", "rm", url, "--run", ids[0])
    assert code == 0 and "removed 1 run(s)" in out, out
    assert not Path(url, ids[0]).exists() and Path(url, ids[1]).is_dir()
