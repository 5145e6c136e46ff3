"""A DCP reader that runs no code from the checkpoint it reads: every DCP load in the project goes through it.

torch's own reader unpickles `.metadata` with plain `pickle.load` and the default load planner reads each non-tensor
entry with `torch.load(weights_only=False)`, so a crafted step directory runs arbitrary code when it is loaded.
`SafeFsspecReader` unpickles `.metadata` admitting only the classes DCP writes there (`METADATA_GLOBALS`, found by
unpickling this project's 1-process, DDP and FSDP checkpoints with a recording `find_class`) and every torch dtype,
and reads non-tensor entries with `torch.load(weights_only=True)` (plain ints, floats, strings, tuples, lists,
dicts, None: the loop state and optimizer hyperparameters). Tensors were already read weights-only by torch.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

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
    return metadata


def refusal(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unrestricted."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s*Please use|\n\n|$)", text, re.DOTALL)
    return " ".join((found.group(1) if found else text).split()) or type(error).__name__


class WeightsOnlyBytes(LoadPlanner):
    """Hands DCP's planner each non-tensor entry only once `torch.load(weights_only=True)` has accepted it."""

    def __init__(self, planner: LoadPlanner, storage_data: dict[MetadataIndex, Any], url: str) -> None:
        self.planner, self.storage_data, self.url = planner, storage_data, url

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Load weights-only, then pass the planner a copy re-saved from the accepted object."""
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            where = self.storage_data[read_item.storage_index].relative_path
            fqn = read_item.dest_index.fqn
            raise pickle.UnpicklingError(
                f"{self.url}/{where}: entry {fqn} does not load weights-only ({refusal(e)})"
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
    """DCP's fsspec reader with `.metadata` unpickled from an allow-list and non-tensor entries read weights-only."""

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
        """Read this rank's items; tensors as torch does (weights-only), the rest through `WeightsOnlyBytes`."""
        return super().read_data(plan, WeightsOnlyBytes(planner, self.storage_data, self.url.rstrip("/")))
