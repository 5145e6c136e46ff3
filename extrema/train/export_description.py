"""An exported file's self-description: everything needed to rebuild its model without this package.

The description is one JSON object: the format, the branch, where the weights came from, our model settings
(`model`, a ModelSpec) and, for timm layouts, the timm model (`timm`: its class, constructor `kwargs` and the
`create_model` arguments). It travels in three places: a sidecar `<file>.json` beside every export, the metadata of
a `.safetensors` export (`extrema_export`, plus `timm_create_model` alone for the two-line recipe), and a key of an
official-layout `.pth` (`extrema_export`, a JSON string; the official code reads only `state_dict`). Torch-free.

    args = json.loads(safe_open(path, "pt").metadata()["timm_create_model"])
    model = timm.create_model(**args); model.load_state_dict(safetensors.torch.load_file(path))  # strict
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from extrema.run import rundir

SCHEMA = 1
DESCRIPTION_KEY = "extrema_export"  # safetensors metadata key, and a key of an official-layout .pth (JSON text)
CREATE_MODEL_KEY = "timm_create_model"  # safetensors metadata key: `timm.create_model(**json.loads(value))`
SIDECAR_SUFFIX = ".json"
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is not read


def sidecar_url(url: str) -> str:
    """The description file beside an export: `<file>.json`."""
    return url + SIDECAR_SUFFIX


def describe(
    fmt: str,
    source: str,
    model: Mapping[str, Any],
    design: str,
    branch: str | None = None,
    timm: Mapping[str, Any] | None = None,
    official_loadable: bool | None = None,
) -> dict[str, Any]:
    """The description of one export (JSON-able); `timm` for the timm layouts, `official_loadable` for official."""
    out: dict[str, Any] = {"extrema_export": SCHEMA, "format": fmt, "source": source, "design": design}
    out["model"] = dict(model)
    if branch is not None:
        out["branch"] = branch
    if timm is not None:
        out["timm"] = dict(timm)
    if official_loadable is not None:
        out["official_loadable"] = official_loadable
    return out


def safetensors_metadata(description: Mapping[str, Any]) -> dict[str, str]:
    """The metadata a `.safetensors` export carries: the description, and the `timm.create_model` arguments."""
    meta = {DESCRIPTION_KEY: json.dumps(description, sort_keys=True)}
    if "timm" in description:
        meta[CREATE_MODEL_KEY] = json.dumps(description["timm"]["create_model"], sort_keys=True)
    return meta


def write_sidecar(url: str, description: Mapping[str, Any]) -> str:
    """Write the description beside the export; its URL."""
    side = sidecar_url(url)
    rundir.write_json(side, dict(description))
    return side


def safetensors_header_metadata(url: str) -> dict[str, str]:
    """The `__metadata__` of a `.safetensors` file, read from its header alone (no tensor is read)."""
    fs, path = rundir.filesystem(url)

    def read(f: Any) -> Any:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{url}: not a safetensors file (shorter than its header length)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{url}: a safetensors header of {size} bytes is over the {MAX_HEADER_BYTES} read")
        try:
            return json.loads(f.read(size))
        except ValueError as e:
            raise ValueError(f"{url}: not a safetensors file (its header is not JSON)") from e

    header = rundir.read_stable(fs, path, "rb", read)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def parse(text: Any, where: str) -> dict[str, Any]:
    """A description from its JSON text (or an already parsed object); ValueError naming `where` when it is not one."""
    try:
        obj = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise ValueError(f"{where}: the export description is not JSON ({e})") from e
    if not isinstance(obj, dict) or obj.get("extrema_export") != SCHEMA or not isinstance(obj.get("model"), dict):
        raise ValueError(f"{where}: not an extrema export description (schema {SCHEMA})")
    return obj


def read_description(url: str, embedded: Any = None) -> dict[str, Any] | None:
    """An export's description: `embedded` (the `extrema_export` value of a loaded .pth), else the sidecar
    `<file>.json`, else a `.safetensors` file's metadata; None when the file carries none."""
    if embedded is not None:
        return parse(embedded, url)
    side = sidecar_url(url)
    if rundir.exists(side):
        return parse(rundir.read_json(side), side)
    if url.endswith(".safetensors"):
        meta = safetensors_header_metadata(url)
        if DESCRIPTION_KEY in meta:
            return parse(meta[DESCRIPTION_KEY], url)
    return None
