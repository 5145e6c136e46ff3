"""Reading sweep YAML safely: duplicate keys refused, `include:` merged underneath, problems located by line.

Bounded before anything is built: a sweep file and its includes may total MAX_YAML_BYTES (checked before
parsing); a document may hold MAX_NODES nodes, nested at most MAX_DEPTH deep (counted while PyYAML composes, so
parsing stops there), and as many once its aliases are expanded (counted on the composed node graph, each shared
node once, before any value is constructed): a "billion laughs" document or a recursive alias is refused in
milliseconds instead of filling memory downstream.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from launch.inputs.errors import InvalidSweep, Loc, Problem

MAX_YAML_BYTES = 1 << 20  # a sweep file and its includes together
# Values of one document, aliases expanded: a big sweep file has ~1,000; PyYAML composes ~20,000 a second here.
MAX_NODES = 50_000
MAX_DEPTH = 64  # nesting levels of one document (experiments nest about 5 deep)
TOO_MANY = f"the document has more than {MAX_NODES:,} values (aliases expanded)"
TOO_DEEP = f"the document nests more than {MAX_DEPTH} levels deep"


class TooBig(yaml.composer.ComposerError):
    """A document nested deeper than MAX_DEPTH or with more than MAX_NODES values."""


class StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, nesting past MAX_DEPTH and more than MAX_NODES nodes, and
    reads `1e-4` as a number (YAML 1.2), not a string."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """Compose one node; TooBig past MAX_DEPTH levels (PyYAML would recurse until Python stops it) or
        MAX_NODES nodes (refused before the rest of the file is composed)."""
        self._nodes += 1
        if self._depth >= MAX_DEPTH or self._nodes > MAX_NODES:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            reason = TOO_DEEP if self._depth >= MAX_DEPTH else TOO_MANY
            raise TooBig(None, None, reason, mark)  # type: ignore[no-untyped-call]
        self._depth += 1
        try:
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping, refusing a key that appears twice."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable keys are refused by the base class with its own message
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)  # type: ignore[no-untyped-call]
        return super().construct_mapping(node, deep=deep)


StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass(frozen=True)
class Source:
    """One YAML file that contributed to a sweep, with its node tree for finding lines."""

    file: str
    node: yaml.Node | None
    size: int = 0  # bytes read


def deep_merge(under: Any, over: Any) -> Any:
    """`over` on top of `under`: mappings merge key by key, anything else is replaced by `over`."""
    if isinstance(under, dict) and isinstance(over, dict):
        out = dict(under)
        for k, v in over.items():
            out[k] = deep_merge(under.get(k), v) if k in under else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def expansion_problem(root: yaml.Node) -> tuple[str, yaml.Node] | None:
    """Why a node graph is too big with its aliases expanded, too deep or recursive, and where; None when fine.

    Each distinct node is visited once (aliases share nodes), so the check is linear in the file, not in the
    expansion.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_.discard(key)
            if size[key] > MAX_NODES:
                return TOO_MANY, node
            if depth[key] > MAX_DEPTH:
                return TOO_DEEP, node
            continue
        if key in size:
            continue
        if key in open_:  # only the node's own descendants are pushed while it is open
            return "an alias refers to a collection that contains it (a recursive document)", node
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)
    return None


def read_text(path: Path, limit: int = MAX_YAML_BYTES) -> str:
    """The file's text; InvalidSweep when it is missing, unreadable, not UTF-8 or over `limit` bytes."""
    file = str(path)
    rule = f"a sweep file and its includes may have {MAX_YAML_BYTES:,} bytes ({MAX_YAML_BYTES / 2**20:g} MiB) in all"
    left = f" ({limit:,} left after the files read before it)" if limit < MAX_YAML_BYTES else ""
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidSweep([Problem(file, (), f"the file has {size:,} bytes; {rule}{left}")])
        with path.open(encoding="utf-8") as f:
            text = f.read(limit + 1)  # a bound for what stat cannot size (pipes, devices)
    except FileNotFoundError:
        raise InvalidSweep([Problem(file, (), "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSweep([Problem(file, (), f"cannot read: {e}")]) from None
    if len(text) > limit:
        raise InvalidSweep([Problem(file, (), f"the file has more than {limit:,} characters; {rule}{left}")])
    return text


def parse_yaml(text: str, file: str) -> tuple[Any, yaml.Node | None]:
    """The document of a YAML text and its node tree; InvalidSweep (naming `file`) for bad or oversized ones."""
    loader = None
    try:
        loader = StrictSafeLoader(text)  # the reader refuses non-printable characters here already
        node = loader.get_single_node()
        refused = expansion_problem(node) if node is not None else None
        if refused is not None:
            reason, at = refused
            raise InvalidSweep([Problem(file, (), reason, at.start_mark.line + 1)])
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        reason = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        reason = reason if isinstance(e, TooBig) else f"YAML syntax: {reason}"
        raise InvalidSweep([Problem(file, (), reason, mark.line + 1 if mark else None)]) from None
    except RecursionError:
        raise InvalidSweep([Problem(file, (), TOO_DEEP)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def read_yaml(path: Path, limit: int = MAX_YAML_BYTES) -> tuple[Any, yaml.Node | None]:
    """The document of one YAML file and its node tree; InvalidSweep for unreadable, oversized or bad files."""
    return parse_yaml(read_text(path, limit), str(path))


RECIPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.ya?ml")


def recipes_dir() -> Path:
    """The project's recipes (jobs/recipes beside the installed packages: a checkout, or an editable install)."""
    return Path(__file__).resolve().parents[2] / "jobs" / "recipes"


def recipe(name: str) -> Path | None:
    """The recipe a bare file name (`vit_small_in1k.yaml`) names; None for any other name."""
    return recipes_dir() / name if RECIPE_NAME.fullmatch(name) else None


def load_with_includes(
    path: Path, chain: tuple[Path, ...] = (), budget: int = MAX_YAML_BYTES
) -> tuple[dict[str, Any], list[Source]]:
    """The file's mapping with its `include:` files (relative to it, else a recipe of jobs/recipes by its bare file
    name) merged underneath, and every source file; all of them together at most `budget` bytes."""
    file = str(path)
    text = read_text(path, budget)
    data, node = parse_yaml(text, file)
    size = len(text.encode())
    if data is None:
        raise InvalidSweep([Problem(file, (), "the file is empty")])
    if not isinstance(data, dict):
        raise InvalidSweep([Problem(file, (), f"the top level must be a mapping, not {type(data).__name__}")])
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise InvalidSweep(
            locate([Problem(file, ("include",), "must be a file name or a list of file names")], [Source(file, node)])
        )
    merged: dict[str, Any] = {}
    included: list[Source] = []
    here = path.resolve()
    for i, name in enumerate(includes):
        beside = path.parent / name
        found = next((t for t in (beside, recipe(name)) if t is not None and t.is_file()), None)
        target = (found or beside).resolve()
        if target in (*chain, here):
            cycle = " -> ".join(str(p) for p in (*chain, here, target))
            raise InvalidSweep(locate([Problem(file, ("include", i), f"include cycle: {cycle}")], [Source(file, node)]))
        if found is None:
            looked = " or ".join(str(t) for t in (beside.resolve(), recipe(name)) if t is not None)
            problem = Problem(file, ("include", i), f"included file {name!r} not found (looked for {looked})")
            raise InvalidSweep(locate([problem], [Source(file, node)]))
        used = size + sum(s.size for s in included)
        sub, sources = load_with_includes(found, (*chain, here), budget - used)
        merged = deep_merge(merged, sub)
        included = sources + included
    return deep_merge(merged, data), [Source(file, node, size), *included]


def _walk(node: yaml.Node | None, loc: Loc) -> tuple[int, int | None]:
    """How many parts of `loc` exist under `node`, and the line of the deepest one."""
    depth, line = 0, None
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    nxt, line = value, key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        node, depth = nxt, depth + 1
    return depth, line


def locate(problems: list[Problem], sources: list[Source]) -> list[Problem]:
    """Problems attributed to the file (and line) that wrote the deepest part of their path."""
    out = []
    for p in problems:
        if p.line is not None or not sources:
            out.append(p)
            continue
        best = max(sources, key=lambda s: _walk(s.node, p.loc)[0])  # max() keeps the first of equals
        depth, line = _walk(best.node, p.loc)
        out.append(replace(p, file=best.file if depth else (p.file or sources[0].file), line=line))
    return out
