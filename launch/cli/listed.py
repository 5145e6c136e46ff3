"""What `du`, `gc` and `rm` look at: the sweep a FILE|URL names, or the sweeps of a run-store root, with every file
below it from one recursive listing."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from extrema.run import rundir
from launch.addressed import is_sweep_file
from launch.cli.arguments import ROOT_HELP
from launch.inputs.errors import UsageError
from launch.runstore import disk_usage, roots, store
from launch.runstore.disk_usage import Found
from launch.sweepfile.expand import load_sweep

TARGET_HELP = "a sweep YAML file, the <root>/<sweep> URL of a run store, or a root holding sweeps"
SWEEP_HELP = "a sweep YAML file, or the <root>/<sweep> URL of a run store"


@dataclass
class Listed:
    """The sweeps a command line names (URL -> files below it) and, for a root, its files outside any sweep."""

    url: str
    sweeps: dict[str, list[Found]]
    root: bool = False
    outside: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # `path: reason` of local folders that could not be read


def add_store_target(p: argparse.ArgumentParser, roots_too: bool) -> None:
    """The FILE|URL a command looks at (with `roots_too`, a root holding sweeps may be named) and its --root."""
    p.add_argument("target", metavar="FILE|URL", help=TARGET_HELP if roots_too else SWEEP_HELP)
    p.add_argument("--root", help=ROOT_HELP)


def store_url(target: str, root: str | None) -> str:
    """The run-store URL a FILE|URL argument names (a sweep file: its sweep's); UsageError when it cannot be one
    or cannot be reached."""
    if is_sweep_file(target):
        sweep, _ = load_sweep(target, root=root)
        url = store.sweep_url(sweep.root, sweep.name)
    else:
        try:
            url = store.normalize_root(target)
        except ValueError as e:
            raise UsageError(str(e)) from None
    roots.check_usable(url, write=False)
    return url


def listed_target(target: str, root: str | None, sweeps_only: bool = False) -> Listed:
    """The sweep or the root's sweeps a FILE|URL names, listed once; UsageError when it is neither (nothing there,
    or a folder with no manifest), or a root where `sweeps_only`."""
    url = store_url(target, root)
    problems: list[str] = []
    files = disk_usage.listed(url, problems)
    if any(f.path == store.MANIFEST for f in files) or (is_sweep_file(target) and files):
        return Listed(url, {url: files}, problems=problems)
    if is_sweep_file(target):
        raise UsageError(f"{target}: never swept to {url} (nothing is stored there)")
    inner, outside = disk_usage.split_root(files)
    if not inner:
        what = "nothing is stored there" if not files else f"no {store.MANIFEST} there or in a folder below"
        raise UsageError(f"{url}: neither a sweep nor a root holding sweeps ({what})")
    if sweeps_only:
        raise UsageError(f"{url}: a root holding {len(inner)} sweep(s); name one: {url}/<sweep>")
    return Listed(url, {rundir.join(url, n): fs for n, fs in inner.items()}, True, outside, problems)


def check_writable(url: str) -> None:
    """UsageError (one line naming the path) unless the store at `url` can be written here."""
    roots.check_usable(url, write=True)
