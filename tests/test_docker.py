"""The cluster image, without a Docker engine: what docker/Dockerfile installs matches pyproject.toml, and every
file it copies exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CLUSTER_EXTRAS = {"s3", "track", "detect", "plot", "slurm", "ray"}  # every extra a recipe or backend needs
IMPORT_NAMES = {
    "pycocotools": "pycocotools",
    "submitit": "submitit",
    "ray": "ray",
    "matplotlib": "matplotlib",
    "s3fs": "s3fs",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}
TESTED_TORCH = "2.14.1"  # what this project is tested with (pip here resolves it from a local mirror)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def installed_extras() -> set[str]:
    """The extras of the project's own `pip install ".[...]"`."""
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    found = re.findall(r"pip install \"?\.\[([a-z0-9,\s-]+)\]\"?", runs)
    assert len(found) == 1, f"expected one pip install of the project, found {found}"
    return {e.strip() for e in found[0].split(",")}


def test_every_copy_source_exists() -> None:
    copies = [shlex.split(args) for word, args in instructions() if word == "COPY"]
    assert copies
    for parts in copies:
        sources = [p for p in parts[:-1] if not p.startswith("--")]
        assert sources, parts
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such file in the build context (the repository root)"


def test_the_installed_project_is_complete() -> None:
    copied = {shlex.split(args)[0].rstrip("/") for word, args in instructions() if word == "COPY"}
    copied |= {p for word, args in instructions() if word == "COPY" for p in shlex.split(args)[:-1]}
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in copied and (REPO / package / "__init__.py").exists(), package


def test_extras_match_pyproject_and_cover_the_cluster() -> None:
    extras = installed_extras()
    declared = PYPROJECT["project"]["optional-dependencies"]
    assert extras <= set(declared), f"not in pyproject.toml: {extras - set(declared)}"
    assert extras >= CLUSTER_EXTRAS
    assert "dev" not in extras
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    checked = re.search(r'python -c "import ([^"]+)"', runs)
    assert checked is not None, "the image build imports what it installed"
    imported = {m.strip() for m in checked.group(1).split(",")}
    for extra in extras:
        for dep in declared[extra]:
            assert IMPORT_NAMES[Requirement(dep).name] in imported, (extra, dep)


def test_the_image_pins_the_tested_torch_and_brings_nccls_network_libraries() -> None:
    args = dict(re.findall(r"ARG (\w+)=(\S+)", DOCKERFILE.read_text()))
    froms = [a for word, a in instructions() if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"] and "bookworm" in args["BASE_IMAGE"]  # Debian: the rdma-core packages below
    assert args["TORCH_VERSION"] == TESTED_TORCH
    torch_req = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch>"))
    assert Version(TESTED_TORCH) in torch_req.specifier
    runs = " ".join(args for word, args in instructions() if word == "RUN")
    assert 'pip install "torch==${TORCH_VERSION}"' in runs
    assert runs.index("torch==") < runs.index('pip install ".[')  # the project's install keeps the pinned torch
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers"):
        assert f" {package}" in runs, package
