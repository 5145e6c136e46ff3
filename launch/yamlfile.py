"""Reading sweep YAML safely: duplicate keys refused, `include:` merged underneath, problems located by line."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from launch.errors import InvalidSweep, Loc, Problem


class StrictSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys and reads `1e-4` as a number (YAML 1.2), not a string."""

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


def deep_merge(under: Any, over: Any) -> Any:
    """`over` on top of `under`: mappings merge key by key, anything else is replaced by `over`."""
    if isinstance(under, dict) and isinstance(over, dict):
        out = dict(under)
        for k, v in over.items():
            out[k] = deep_merge(under.get(k), v) if k in under else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """The document of one YAML file and its node tree; InvalidSweep for unreadable files or bad syntax."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidSweep([Problem(file, (), "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSweep([Problem(file, (), f"cannot read: {e}")]) from None
    loader = None
    try:
        loader = StrictSafeLoader(text)  # the reader refuses non-printable characters here already
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        reason = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise InvalidSweep([Problem(file, (), f"YAML syntax: {reason}", mark.line + 1 if mark else None)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def load_with_includes(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Source]]:
    """The file's mapping with its `include:` files (relative to it) merged underneath, and every source file."""
    file = str(path)
    data, node = read_yaml(path)
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
        target = (path.parent / name).resolve()
        if target in (*chain, here):
            cycle = " -> ".join(str(p) for p in (*chain, here, target))
            raise InvalidSweep(locate([Problem(file, ("include", i), f"include cycle: {cycle}")], [Source(file, node)]))
        if not target.is_file():
            problem = Problem(file, ("include", i), f"included file {name!r} not found (looked for {target})")
            raise InvalidSweep(locate([problem], [Source(file, node)]))
        sub, sources = load_with_includes(path.parent / name, (*chain, here))
        merged = deep_merge(merged, sub)
        included = sources + included
    return deep_merge(merged, data), [Source(file, node), *included]


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
