"""tpmlab.store: a content-addressed, versioned weight store.

    >>> from tpmlab.store import Store
    >>> store = Store("/tmp/weights")
    >>> v1 = store.commit(model.state_dict(), config=model.config.to_dict(), message="base")
    >>> store.tag("base", v1)
    >>> stage = store.load("base", keys=lambda n: n.startswith("model.layers.1"))

See ``tpmlab.store.manifest`` for the on-disk format and ``tpmlab.store.delta`` for
low-rank edits.
"""

from .chunking import CHUNK_SIZE
from .default import default_store
from .delta import LowRankDelta, apply_low_rank
from .diff import TensorDiff
from .errors import (
    RefError,
    StoreError,
    StoreInputError,
    StoreIntegrityError,
    StoreLockedError,
    UnsafeRefError,
)
from .io import IOStats
from .manifest import VersionInfo
from .objects import FsspecObjectStore, LocalObjectStore, ObjectStore, open_object_store
from .reports import GcReport, VerifyReport
from .store import Store

__all__ = [
    "CHUNK_SIZE", "ObjectStore", "FsspecObjectStore", "GcReport", "IOStats", "LocalObjectStore",
    "LowRankDelta", "RefError", "Store", "StoreError", "StoreInputError", "StoreIntegrityError",
    "StoreLockedError",
    "TensorDiff", "UnsafeRefError", "VerifyReport", "VersionInfo", "apply_low_rank",
    "default_store", "open_object_store",
]
