"""The status table of a sweep: one row per run and stage, reconciled with the backends, and its live watch."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from extrema.run import bad_nodes, contract, rank_progress
from extrema.run.contract import StageState
from launch.addressed import DAMAGED, FAILED, OK, Addressed, print_notes, print_unreadable, swept_axes
from launch.inputs.printable import clip, printable
from launch.progress import latest_progress
from launch.reconcile import Reconciled, reconcile
from launch.runstore import results, stage_records, store
from launch.views import tables
from launch.views.tables import cell

MAX_ERROR = 300  # characters of a failed stage's error shown below the table
SHOWN_FAILURES = 20  # failed stages whose errors are listed below the table


def _latest(state: str | None, status: dict[str, Any], result: Any, stage_dir: str, tree: str | None) -> str:
    if state == StageState.RUNNING:
        p = latest_progress(stage_dir, tree)
        loss = f" loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""
        shown = f"step {p['step']}/{p['total_steps']}{loss}" if p.get("total_steps") else "started"
        ranks = _ranks(stage_dir)
        return f"{shown} · {ranks}" if ranks else shown
    if isinstance(result, dict):
        nums = {
            k: v for k, v in results.flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        keys = sorted(nums, key=lambda k: ("top1" not in k, "loss" not in k, k))[:2]
        return " ".join(f"{k}={nums[k]:.4g}" for k in keys)
    error = status.get("error")
    return str(error)[:60] if error else ""


def _ranks(stage_dir: str) -> str | None:
    """The running stage's ranks from their progress records (the rank behind, a silent one, stragglers)."""
    try:
        return rank_progress.summary(stage_dir, time.time())
    except Exception:  # a store that does not answer now: the row shows the rest
        return None


def _elapsed(status: dict[str, Any]) -> str:
    start, end = status.get("started_at"), status.get("finished_at")
    if not isinstance(start, (int, float)):
        return "-"
    seconds = (end if isinstance(end, (int, float)) else time.time()) - start
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


@dataclass
class StatusTable:
    """What `status` shows: the table's columns, rows and styles, and the reconciled state of every job key."""

    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    styles: list[dict[str, str]]
    pairs: list[tuple[str, str | None]]
    seen: Reconciled
    keys: list[str]
    problems: list[str]  # `path: reason` of every unreadable record (its row shows `unreadable`)
    errors: dict[str, str]  # key -> why each failed stage failed, whole (the table's row shows its start)
    bad_nodes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> its status's bad nodes
    avoiding: dict[str, bool] = field(default_factory=dict)  # key -> whether its next attempt avoids them

    def records(self) -> list[dict[str, Any]]:
        """The table as JSON records, each with its stage's whole `error` (empty unless it failed) and the nodes its
        failures named (`bad_nodes`, which its next attempt avoids as far as it stays runnable)."""
        return [
            {
                **dict(zip(self.columns, row)),
                "error": self.errors.get(k, ""),
                "bad_nodes": [e["node"] for e in self.bad_nodes.get(k, [])],
            }
            for k, row in zip(self.keys, self.rows)
        ]


def status_table(target: Addressed, write: bool = True, fresh: bool = False) -> StatusTable:
    """Every run and stage of the sweep with its state (asking the backends), attempts, elapsed and latest metric;
    the backends' corrections are recorded when `write` and the store takes them; `fresh`: the ledger unused."""
    keys = [k for r in target.runs for k in r.job_keys()]
    read = stage_records.read(target.url, keys, write=write, fresh=fresh)
    statuses = read.statuses
    seen = reconcile(target.url, statuses, target.launcher, target.manifest, write=write)
    states = seen.states
    done = [k for k in keys if states.get(k) == StageState.COMPLETED]
    late = [k for k in done if k not in read.results]  # found completed by asking the backends
    stage_records.read_results(target.url, late, read)
    found = {k: read.results[k] for k in done}
    problems = [*target.problems, *read.problems(), *seen.problems]
    tree = store.real_tree(target.url)
    paths = swept_axes(target.runs)
    columns = ("run", "stage", *paths, "state", "attempts", "elapsed", "latest", "job id", "code")
    rows, styles, pairs = [], [], []
    errors: dict[str, str] = {}
    bad: dict[str, list[dict[str, Any]]] = {}
    avoiding: dict[str, bool] = {}
    for run in target.runs:
        flat = results.flatten(run.overrides)
        for stage, key in zip(run.stages, run.job_keys()):
            s, state = statuses[key], states.get(key)
            if key in seen.corrected:
                s = {**s, "error": seen.corrected[key]}
            if key in seen.stuck:
                s = {**s, "error": "submission interrupted before the job was sent; `sweep` submits it again"}
            latest = _latest(state, s, found.get(key), store.stage_url(target.url, run.run_id, stage), tree)
            if state == StageState.FAILED and s.get("error"):
                errors[key] = clip(printable(str(s["error"])), MAX_ERROR)
            if named := bad_nodes.named(s):
                bad[key], avoiding[key] = named, target.launcher.resources_for(stage).exclude_bad_nodes
            if key in seen.holders:
                latest = f"{latest} (pid {seen.holders[key].pid} on {seen.holders[key].host})"
            hosts = s.get("hosts")
            if state == StageState.RUNNING and isinstance(hosts, list) and len(hosts) > 1:
                latest = f"{latest} on nodes {', '.join(map(str, hosts[:8]))}"
            swept = (cell(flat.get(p)) for p in paths)
            code = str(s.get("code") or s.get("submitted_code") or "")[:12]
            rows.append((run.run_id, stage, *swept, cell(state), cell(s.get("attempts")), _elapsed(s), latest,
                         cell(s.get("job_id")), code))  # fmt: skip
            styles.append({"state": tables.STATE_STYLES.get(state or "", "")})
            pairs.append((stage, state))
    return StatusTable(columns, rows, styles, pairs, seen, keys, problems, errors, bad, avoiding)


def show_status(out: Console, title: str, view: StatusTable) -> None:
    """Print the status table and the notes on backends that could not be asked."""
    tables.show(out, title, view.columns, view.rows, view.styles, view.pairs)
    print_failures(out, view.errors)
    print_bad_nodes(out, view)
    print_notes(out, view.seen)
    print_unreadable(out, view.problems)


def print_failures(out: Console, errors: dict[str, str]) -> None:
    """Why each failed stage failed, one line each (the first `SHOWN_FAILURES`, then how many more)."""
    for key, error in list(errors.items())[:SHOWN_FAILURES]:
        out.print(Text(f"{key} failed: {error}", style="red"), soft_wrap=True, markup=False, highlight=False)
    if len(errors) > SHOWN_FAILURES:
        out.print(Text(f"... and {len(errors) - SHOWN_FAILURES} more failed stage(s)", style="red"))


def bad_nodes_line(key: str, named: list[dict[str, Any]], avoiding: bool) -> str:
    """One line on the nodes a stage's failures named, latest first, and whether its next attempt avoids them."""
    shown = [f"{e['node']} ({clip(printable(str(e.get('reason') or '')), 80)})" for e in reversed(named)]
    how = "avoided on retry" if avoiding else "not avoided: exclude_bad_nodes is off"
    return f"{key} bad nodes, {how}: {', '.join(shown[:8])}"


def print_bad_nodes(out: Console, view: StatusTable) -> None:
    """The nodes each stage's failures named, one line per stage (the first `SHOWN_FAILURES`)."""
    for key, named in list(view.bad_nodes.items())[:SHOWN_FAILURES]:
        line = bad_nodes_line(key, named, view.avoiding.get(key, True))
        out.print(Text(line, style="yellow"), soft_wrap=True, markup=False, highlight=False)


def status_code(view: StatusTable) -> int:
    """3 when a record is unreadable, else 1 when a stage failed, else 0."""
    if view.problems:
        return DAMAGED
    return FAILED if any(view.seen.states.get(k) == StageState.FAILED for k in view.keys) else OK


def _rendered(out: Console, view: StatusTable, title: str) -> Text:
    """The status table as `out` would print it, as one Text for a live display."""
    buf = io.StringIO()
    colors = cast(Any, out.color_system)  # the same system, named as Console() takes it
    shadow = Console(file=buf, width=out.width, force_terminal=out.is_terminal, color_system=colors)
    show_status(shadow, title, view)
    return Text.from_ansi(buf.getvalue().rstrip("\n"))


def _reread(target: Addressed) -> Addressed:
    """The target with its manifest read again (a URL target's runs too): a sweep may (re)submit meanwhile."""
    try:
        manifest = store.read_manifest(target.url)
    except store.Unreadable:
        return target
    if manifest is None:
        return target
    try:
        runs = target.runs if target.sweep is not None else store.stored_runs_of(target.url, manifest)
    except store.Unreadable:
        return target
    return replace(target, manifest=manifest, runs=runs)


def watch_status(target: Addressed, out: Console, interval: float) -> int:
    """Refresh the status table every `interval` seconds until every stage has ended; then status's exit code."""
    try:
        with Live(console=out, auto_refresh=False, transient=False) as live:
            while True:
                view = status_table(target)
                ended = sum(view.seen.states.get(k) in {*contract.TERMINAL, store.UNREADABLE} for k in view.keys)
                if ended == len(view.keys):
                    footer = f"all {ended} stages have ended"
                else:
                    footer = (
                        f"{ended} of {len(view.keys)} stages ended · {time.strftime('%H:%M:%S')} · refreshed every "
                        f"{interval:g} s until all have ended · Ctrl-C stops watching"
                    )
                live.update(Group(_rendered(out, view, target.url), Text(footer, style="dim")), refresh=True)
                if ended == len(view.keys):
                    return status_code(view)
                time.sleep(interval)
                target = _reread(target)
    finally:
        if not out.is_terminal:  # a live display ends its last line only on a terminal
            out.line()
