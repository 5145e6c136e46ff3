"""A DCP reader that runs no code from the checkpoint it reads; a save planner that pickles nothing but `.metadata`.

torch's own reader unpickles `.metadata` with plain `pickle.load`, and its default load planner unpickles each
non-tensor entry with a full (not weights-only) `torch.load`, so a crafted step directory runs code when loaded.
`SafeFsspecReader` unpickles `.metadata` admitting only the classes DCP writes there (`METADATA_GLOBALS`, found by
unpickling this project's 1-process, DDP and FSDP checkpoints with a recording `find_class`) and every torch dtype,
and reads data only from files its saves name (`checkpoint_dirs.SHARD_FILE`: no path leads out of the step).
`JsonSavePlanner` writes each non-tensor entry (the loop state and optimizer hyperparameters) as `JSON_MAGIC` and a
tagged JSON tree (`encode_state`), which the reader decodes; entries written before it (torch.save bytes) are read
with `torch.load(weights_only=True)`. Tensors were already read weights-only by torch.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem, WriteItem, WriteItemType
from torch.futures import Future

from extrema.run.checkpoint_dirs import shard_rank

METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum: called with an int
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name in a dict
        ("torch", "Size"),
    }
)


# Starts every non-tensor entry JsonSavePlanner writes; torch.save bytes start with b"PK" (zip) or b"\x80" (pickle).
JSON_MAGIC = b"extrema-json\n"
SPECIAL_FLOATS = ("nan", "inf", "-inf")
TAGS = ("float", "tuple", "list", "dict")
JSON_STATE = "None, bool, int, float, str, and tuples, lists and str-keyed dicts of them"


def to_tree(value: Any, where: str) -> Any:
    """`value` as a JSON tree whose every object is a one-key tag ({"tuple": [...]}, {"float": "nan"}, ...)."""
    kind = type(value)
    if value is None or kind in (bool, int, str) or (kind is float and math.isfinite(value)):
        return value
    if kind is float:
        return {"float": repr(value)}
    if kind in (tuple, list):
        return {kind.__name__: [to_tree(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if kind is dict:
        bad = next((k for k in value if type(k) is not str), None)
        if bad is not None:
            raise TypeError(f"checkpoint entry {where}: dict key {bad!r} ({type(bad).__qualname__}) is not a str")
        return {"dict": {k: to_tree(v, f"{where}[{k!r}]") for k, v in value.items()}}
    raise TypeError(f"checkpoint entry {where} is a {kind.__qualname__}: non-tensor state must be {JSON_STATE}")


def from_tree(node: Any) -> Any:
    """The value `to_tree` encoded; ValueError for anything it never writes."""
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is not dict or len(node) != 1 or next(iter(node)) not in TAGS:
        raise ValueError(f"unexpected {json.dumps(node)[:80]}")
    ((tag, body),) = node.items()
    if tag == "float" and body in SPECIAL_FLOATS:
        return float(body)
    if tag in ("tuple", "list") and type(body) is list:
        items = [from_tree(v) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and type(body) is dict:
        return {k: from_tree(v) for k, v in body.items()}
    raise ValueError(f"malformed {tag!r} tag: {json.dumps(body)[:80]}")


def refuse_constant(name: str) -> Any:
    """JSON's NaN / Infinity literals, which `encode_state` never writes (it tags special floats)."""
    raise ValueError(f"untagged {name}")


def encode_state(value: Any, fqn: str) -> bytes:
    """`JSON_MAGIC` + the tagged JSON of a non-tensor entry; TypeError naming `fqn` for a value JSON state cannot be."""
    return JSON_MAGIC + json.dumps(to_tree(value, fqn), allow_nan=False, separators=(",", ":")).encode()


def decode_state(data: bytes) -> Any:
    """The value `encode_state` wrote (ValueError when `data` is not such an encoding)."""
    if not data.startswith(JSON_MAGIC):
        raise ValueError("no JSON_MAGIC prefix")
    try:
        tree = json.loads(data[len(JSON_MAGIC) :].decode(), parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from None
    return from_tree(tree)


class JsonSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, but non-tensor entries are written as `encode_state` JSON, never pickled."""

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        """Tensors as torch resolves them; non-tensor entries JSON-encoded."""
        if write_item.type != WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return io.BytesIO(encode_state(self.lookup_object(write_item.index), write_item.index.fqn))


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file that asks to load something other than checkpoint data; the message names the file."""


def admitted(module: str, name: str) -> bool:
    """Whether `.metadata` may name the global `module.name`: a DCP metadata class, torch.Size, a layout or a dtype."""
    if (module, name) in METADATA_GLOBALS:
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler whose only globals are those `admitted` names; anything else is an UnsafeCheckpoint."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """The admitted global, never another."""
        if not admitted(module, name):
            raise UnsafeCheckpoint(f"{self.source}: refused to load {module}.{name} (not checkpoint metadata)")
        return super().find_class(module, name)


def read_metadata_file(file: IO[bytes], source: str) -> Metadata:
    """Unpickle a DCP `.metadata` with `MetadataUnpickler`; UnsafeCheckpoint unless it is a Metadata."""
    metadata = MetadataUnpickler(file, source).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{source}: holds a {type(metadata).__name__}, not DCP Metadata")
    stored = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for info in stored.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or shard_rank(name) is None:
            raise UnsafeCheckpoint(f"{source}: names the data file {str(name)[:200]!r}, not one in its step directory")
    return metadata


def refusal(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unrestricted."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Please use|\n\n|$)", text, re.DOTALL)
    return " ".join((found.group(1) if found else text).split()) or type(error).__name__


class CheckedBytes(LoadPlanner):
    """Hands DCP's planner each non-tensor entry only once it decoded as JSON state or loaded weights-only."""

    def __init__(self, planner: LoadPlanner, storage_data: dict[MetadataIndex, Any], url: str) -> None:
        self.planner, self.storage_data, self.url = planner, storage_data, url

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Decode JSON state (or, for bytes without `JSON_MAGIC`, load weights-only); pass the planner a re-save."""
        data = value.getvalue()
        where = f"{self.url}/{self.storage_data[read_item.storage_index].relative_path}"
        fqn = read_item.dest_index.fqn
        if data.startswith(JSON_MAGIC):
            try:
                obj = decode_state(data)
            except ValueError as e:
                raise ValueError(f"{where}: entry {fqn} is not valid JSON state ({e})") from None
        else:
            try:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(
                    f"{where}: entry {fqn} does not load weights-only ({refusal(e)})"
                ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self.planner.load_bytes(read_item, clean)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The planner's destination tensor."""
        return self.planner.resolve_tensor(read_item)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The planner's commit."""
        self.planner.commit_tensor(read_item, tensor)

    def set_up_planner(self, *args: Any, **kwargs: Any) -> None:
        """Not called during read_data."""
        raise NotImplementedError

    def create_local_plan(self) -> LoadPlan:
        """Not called during read_data."""
        raise NotImplementedError

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        """Not called during read_data."""
        raise NotImplementedError

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        """Not called during read_data."""
        raise NotImplementedError


class SafeFsspecReader(FsspecReader):
    """DCP's fsspec reader: `.metadata` unpickled from an allow-list, non-tensor entries checked by `CheckedBytes`."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The step's Metadata (UnsafeCheckpoint when `.metadata` names anything but DCP's metadata types)."""
        path = self._get_metadata_path(kwargs.get("rank"))
        source = f"{self.url.rstrip('/')}/{os.path.basename(path)}"
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_metadata_file(cast(IO[bytes], f), source)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read this rank's items; tensors as torch does (weights-only), the rest through `CheckedBytes`."""
        return super().read_data(plan, CheckedBytes(planner, self.storage_data, self.url.rstrip("/")))
