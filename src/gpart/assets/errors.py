"""The two errors the asset layer raises, so callers (the CLI) can report them without a traceback."""
from __future__ import annotations


class AssetError(RuntimeError):
    """A model or data package could not be fetched, verified, unpacked or converted."""


class DatasetError(ValueError):
    """A dataset name or file is unusable: unknown name, malformed file, missing column, no examples."""
