"""Results of store maintenance: verification and garbage collection."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import StoreIntegrityError


@dataclass
class VerifyReport:
    """What ``Store.verify`` checked and found.

    Attributes:
        versions: digests of the versions checked.
        chunks_checked: distinct chunks read and hashed.
        bytes_checked: their total size in bytes.
        errors: one ``StoreIntegrityError`` per bad chunk, entry, manifest or history record.
        unsealed: versions written before history records existed, whose parent, message
            and timestamp nothing covers yet (not an error: ``Store.seal_history`` or
            ``tpmlab store seal`` gives them their records).
    """

    versions: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    errors: list[StoreIntegrityError] = field(default_factory=list)
    unsealed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if nothing was wrong."""
        return not self.errors

    def __str__(self) -> str:
        head = (f"checked {len(self.versions)} version(s), {self.chunks_checked} chunks, "
                f"{self.bytes_checked / 2**20:.1f} MiB: ")
        note = ""
        if self.unsealed:
            note = (f"\nnote: {len(self.unsealed)} version(s) have no history record yet (written "
                    "by an older tpmlab): run `tpmlab store seal` to cover their parent, message "
                    "and timestamp")
        if self.ok:
            return head + "ok" + note
        return (head + f"{len(self.errors)} problem(s)\n"
                + "\n".join(f"  {e}" for e in self.errors) + note)


@dataclass(frozen=True)
class GcReport:
    """What ``Store.gc`` removed and kept.

    Attributes:
        chunks_deleted: chunks no manifest references, now deleted.
        bytes_freed: their total size in bytes.
        chunks_kept: chunks still referenced.
        bytes_kept: their total size in bytes.
    """

    chunks_deleted: int
    bytes_freed: int
    chunks_kept: int
    bytes_kept: int

    def __str__(self) -> str:
        return (f"deleted {self.chunks_deleted} chunks ({self.bytes_freed / 2**20:.1f} MiB freed), "
                f"kept {self.chunks_kept} ({self.bytes_kept / 2**20:.1f} MiB)")
