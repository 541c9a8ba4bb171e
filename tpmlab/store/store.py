"""The versioned, content-addressed weight store."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import torch

from .chunking import CHUNK_SIZE, dtype_name, tensor_bytes
from .delta import LowRankDelta, apply_low_rank, as_delta
from .diff import TensorDiff, compare
from .errors import RefError, StoreError, StoreInputError, StoreIntegrityError, UnsafeRefError
from .io import IOStats
from .locks import EXCLUSIVE, SHARED, StoreLock, store_lock
from .manifest import (
    VersionInfo,
    canonical_json,
    history_problem,
    is_sealed,
    iter_chunks,
    make_manifest,
    manifest_chunks,
    parse_manifest,
    seal,
    version_digest,
)
from .objects import ObjectStore, open_object_store
from .reader import Reader, check_dense_entry
from .refs import check_tag_name, read_tag, resolve
from .reports import GcReport, VerifyReport
from .writer import hash_tensor, write_chunks

Keys = Iterable[str] | Callable[[str], bool] | None
"""Which tensors to load: all (``None``), a list of names, or a predicate on names."""


def _parents_first(manifests: Mapping[str, dict[str, Any]]) -> list[str]:
    """Every digest of ``manifests``, each after its parent (when the parent is among them)."""
    children: dict[str, list[str]] = {}
    roots = []
    for d in sorted(manifests):
        parent = manifests[d]["parent"]
        if parent in manifests and parent != d:
            children.setdefault(parent, []).append(d)
        else:
            roots.append(d)
    order, todo = [], list(reversed(roots))
    while todo:
        d = todo.pop()
        order.append(d)
        todo.extend(reversed(children.get(d, [])))
    seen = set(order)  # versions in a parent cycle (only an edited store has one) come last
    return order + [d for d in sorted(manifests) if d not in seen]


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """A versioned weight store rooted at a folder or an fsspec URL.

    A *version* is a state dict plus a config, named by a digest that depends only on
    them (see ``tpmlab.store.manifest``). Tensors are cut into 4 MiB chunks stored once
    by SHA-256, so versions that share tensors (or parts of them) share storage, across
    models too. Every read is checked against the digests; bad data raises
    ``StoreIntegrityError`` naming the tensor and chunk.

    ``root`` is a folder path, a URL such as ``"memory://store"`` (any fsspec
    filesystem), or an ``ObjectStore``. ``stats`` counts chunk traffic (see ``IOStats``).

    Concurrency: any number of processes (and threads) may commit, load and tag at
    once, and ``gc`` may run beside them: commits hold the store's lock shared while
    they write, ``gc`` holds it exclusive (see ``tpmlab.store.locks``), so a commit
    waits for a running gc and a gc for the commits in flight.
    """

    def __init__(self, root: str | os.PathLike[str] | ObjectStore, *, threads: int | None = None) -> None:
        self.objects: ObjectStore = open_object_store(root)
        self.lock: StoreLock = store_lock(self.objects)
        self.stats = IOStats()
        self.threads = threads or min(8, (os.cpu_count() or 1) + 2)
        self._manifests: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"Store({self.objects!r})"

    @contextmanager
    def _pool(self) -> Iterator[Executor]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="tpmlab-store") as pool:
            yield pool

    # ----------------------------------------------------------------- refs

    def resolve(self, ref: str) -> str:
        """The full digest of ``ref``: a digest, an unambiguous digest prefix (>= 4 hex), or a tag."""
        return resolve(self.objects, ref)

    def tag(self, name: str, ref: str, force: bool = False) -> str:
        """Point tag ``name`` at ``ref``; return the digest.

        An existing tag pointing elsewhere is moved only with ``force=True``.
        """
        check_tag_name(name)
        digest = self.resolve(ref)
        old = read_tag(self.objects, name)
        if old == digest:
            return digest
        data = f"{digest}\n".encode()
        if old is not None and not force:
            raise StoreError(f"tag {name!r} already points at {old[:12]}; pass force=True to move it")
        try:
            self.objects.put("tags", name, data, overwrite=force)
        except FileExistsError:
            now = read_tag(self.objects, name)
            if now != digest:
                raise StoreError(
                    f"tag {name!r} was just pointed at {str(now)[:12]} by another writer; "
                    "pass force=True to move it"
                ) from None
        return digest

    def untag(self, name: str) -> None:
        """Delete tag ``name`` (the version stays). A tag that is a symbolic link is removed too."""
        try:
            found = read_tag(self.objects, name)
        except UnsafeRefError:
            found = name
        if found is None:
            raise RefError(f"no tag named {name!r}")
        self.objects.delete("tags", name)

    def tags(self) -> dict[str, str]:
        """Every tag and the digest it points at, sorted by name."""
        out = {}
        for name in sorted(self.objects.list("tags")):
            digest = read_tag(self.objects, name)
            if digest is not None:
                out[name] = digest
        return out

    # ------------------------------------------------------------ manifests

    def _manifest(self, digest: str) -> dict[str, Any]:
        """The parsed manifest of a full digest, checked against the digest (cached; don't mutate)."""
        m = self._manifests.get(digest)
        if m is not None:
            return m
        try:
            data = self.objects.get("manifests", digest)
        except KeyError:
            raise RefError(f"version {digest} is not in the store") from None
        try:
            m = parse_manifest(data, digest)
            actual = version_digest(m["config"], m["tensors"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreIntegrityError(
                f"manifest {digest} is unreadable: {e}", chunk=digest, reason="bad manifest"
            ) from e
        if actual != digest:
            raise StoreIntegrityError(
                f"manifest {digest} is corrupted: its content hashes to {actual}",
                chunk=digest, reason="hash mismatch",
            )
        self._manifests[digest] = m
        return m

    def manifest(self, ref: str) -> dict[str, Any]:
        """A copy of the manifest of ``ref`` (format in ``tpmlab.store.manifest``)."""
        return copy.deepcopy(self._manifest(self.resolve(ref)))

    def config(self, ref: str) -> dict[str, Any]:
        """A copy of the config committed with ``ref``."""
        return copy.deepcopy(self._manifest(self.resolve(ref))["config"])

    def info(self, ref: str) -> VersionInfo:
        """Summary of one version; ``StoreIntegrityError`` if its history record was edited."""
        digest = self.resolve(ref)
        return self._info(digest, self._manifest(digest))

    @staticmethod
    def _info(digest: str, m: dict[str, Any]) -> VersionInfo:
        problem = history_problem(m, digest) if is_sealed(m) else None
        if problem:
            raise StoreIntegrityError(problem, chunk=digest, reason="history edited")
        return VersionInfo.from_manifest(digest, m)

    def versions(self) -> list[str]:
        """Digests of every stored version, sorted."""
        return sorted(self.objects.list("manifests"))

    def log(self, ref: str) -> list[VersionInfo]:
        """History of ``ref``: the version itself, its parent, and so on back to a root.

        Stops early (after the last version found) if a parent's manifest is missing.
        Raises ``StoreIntegrityError`` for a history record that was edited (``verify``
        also checks the links between records).
        """
        digest: str | None = self.resolve(ref)
        out: list[VersionInfo] = []
        seen: set[str] = set()
        while digest is not None and digest not in seen:
            seen.add(digest)
            try:
                m = self._manifest(digest)
            except RefError:
                if not out:
                    raise
                break
            out.append(self._info(digest, m))
            digest = m["parent"]
        return out

    # --------------------------------------------------------------- commit

    def commit(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        config: dict[str, Any],
        message: str,
        parent: str | None = None,
        deltas: Mapping[str, LowRankDelta | tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> str:
        """Store a version; return its digest.

        Args:
            state_dict: every tensor of the version, by name (any device; non-CPU tensors are
                copied to CPU one at a time). Names in ``deltas`` may be left out.
            config: JSON-serializable model config (e.g. ``PretrainedConfig.to_dict()``).
            message: a description of the version.
            parent: the version this one derives from (a ref); recorded for ``log``.
            deltas: ``{name: LowRankDelta(u, v)}`` or ``{name: (u, v)}``: tensor ``name`` of
                this version is ``parent[name] + u @ v.T`` (see ``tpmlab.store.delta``), stored
                as the factors plus a reference to the parent's entry. If ``name`` is also in
                ``state_dict`` its value must equal that reconstruction bit for bit.

        Everything is hashed before anything is written; chunks already in the store
        (from any version or model) are not written again, and the manifest is written
        last, so an interrupted commit leaves at most unreferenced chunks (see ``gc``).
        The same weights and config always give the same digest; committing a version
        that is already stored changes nothing and returns its digest (its first
        parent, message and timestamp are kept). The parent, message and timestamp
        form the version's history record, sealed by a digest that also covers the
        parent's record (see ``tpmlab.store.manifest``).

        From the check of which chunks are stored until the manifest is written, the
        commit holds the store's lock shared, so a ``gc`` in another process cannot
        delete the chunks it relies on (it waits for a running gc).
        """
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, got {type(message).__name__}")
        config = self._check_config(config)
        self._check_state_dict(state_dict)
        deltas = {k: as_delta(v) for k, v in (deltas or {}).items()}
        parent_digest = self.resolve(parent) if parent is not None else None
        if deltas and parent_digest is None:
            raise StoreInputError(f"deltas ({', '.join(deltas)}) need a parent version to apply to")
        tensors: dict[str, dict[str, Any]] = {}
        with self._pool() as pool:
            # Hash everything first: a version already stored costs no writes at all.
            dense = {n: hash_tensor(t, pool) for n, t in state_dict.items() if n not in deltas}
            factors: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
            if deltas:
                tensors.update(self._delta_entries(parent_digest, deltas, state_dict, pool))
                factors = {n: (hash_tensor(d.u, pool), hash_tensor(d.v, pool)) for n, d in deltas.items()}
                for n, (u, v) in factors.items():
                    tensors[n]["delta"]["u"], tensors[n]["delta"]["v"] = u, v
            tensors.update(dense)
            tensors = dict(sorted(tensors.items()))
            digest = version_digest(config, tensors)
            with self.lock.hold(SHARED):
                if self.objects.exists("manifests", digest):
                    return digest
                for name, entry in dense.items():
                    write_chunks(self.objects, state_dict[name], entry, pool, self.stats)
                for name, (u, v) in factors.items():
                    write_chunks(self.objects, deltas[name].u, u, pool, self.stats)
                    write_chunks(self.objects, deltas[name].v, v, pool, self.stats)
                parent_history = self._manifest(parent_digest).get("history") if parent_digest else None
                m = make_manifest(version=digest, config=config, tensors=tensors,
                                  parent=parent_digest, parent_history=parent_history,
                                  message=message, timestamp=_utc_now())
                try:
                    self.objects.put("manifests", digest, json.dumps(m, indent=1).encode(),
                                     overwrite=False)
                except FileExistsError:
                    pass  # a concurrent commit of the same version won; same content
        return digest

    @staticmethod
    def _check_config(config: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        try:
            return json.loads(canonical_json(config))
        except (TypeError, ValueError) as e:
            raise TypeError(f"config must be JSON-serializable (no NaN): {e}") from None

    @staticmethod
    def _check_state_dict(state_dict: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
        for name, t in state_dict.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state_dict[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type == "meta":
                raise StoreInputError(f"state_dict[{name!r}] is on the meta device and has no values")
            dtype_name(t.dtype)

    def _delta_entries(
        self, parent: str, deltas: dict[str, LowRankDelta], state_dict: Mapping[str, torch.Tensor],
        pool: Executor,
    ) -> dict[str, dict[str, Any]]:
        pm = self._manifest(parent)
        missing = [n for n in deltas if n not in pm["tensors"]]
        if missing:
            raise StoreInputError(f"deltas name tensors the parent {parent[:12]} lacks: {missing}")
        base_entries = {n: pm["tensors"][n] for n in deltas}
        bases = Reader(self.objects, pool, self.stats).read(base_entries)
        out = {}
        for name, delta in deltas.items():
            base = bases[name]
            delta.check_base(name, tuple(base.shape), base.dtype)
            new = apply_low_rank(base, delta.u, delta.v)
            given = state_dict.get(name)
            if given is not None and (
                given.dtype != new.dtype or given.shape != new.shape
                or tensor_bytes(given) != tensor_bytes(new)
            ):
                raise StoreInputError(
                    f"state_dict[{name!r}] differs from parent + U @ V^T as tpmlab.store.delta "
                    "computes it; compute it with tpmlab.store.apply_low_rank or leave it out"
                )
            entry = hash_tensor(new, pool)
            del entry["chunks"]
            entry["delta"] = {
                "kind": "lowrank",
                "base": base_entries[name],
                "u": None,  # filled in by commit, which writes the factors last
                "v": None,
            }
            out[name] = entry
        return out

    # ----------------------------------------------------------------- load

    def load(self, ref: str, *, keys: Keys = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of ``ref``, checked against their digests.

        ``keys`` selects tensors: ``None`` for all, an iterable of names (``KeyError`` if
        one is absent), or a predicate ``name -> bool``. Only the selected tensors'
        chunks are read. Tensors are built on CPU, then moved to ``device``.
        Raises ``StoreIntegrityError`` naming the tensor and chunk on missing or bad data.
        """
        m = self._manifest(self.resolve(ref))
        names = self._select(m, keys)
        with self._pool() as pool:
            tensors = Reader(self.objects, pool, self.stats).read({n: m["tensors"][n] for n in names})
        if torch.device(device).type != "cpu":
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return tensors

    @staticmethod
    def _select(m: dict[str, Any], keys: Keys) -> list[str]:
        available = m["tensors"]
        if keys is None:
            return list(available)
        if callable(keys):
            return [n for n in available if keys(n)]
        if isinstance(keys, str):
            keys = [keys]
        names = list(dict.fromkeys(keys))
        missing = [n for n in names if n not in available]
        if missing:
            raise KeyError(f"version has no tensor(s) {missing}; it has {len(available)} tensors, "
                           f"e.g. {list(available)[:3]}")
        return names

    # ----------------------------------------------------------------- diff

    def diff(self, a: str, b: str) -> list[TensorDiff]:
        """Tensors that differ from version ``a`` to version ``b``, sorted by name.

        Unchanged tensors (same content digest) are left out and not read; changed ones
        are read from both versions and compared (see ``TensorDiff``).
        """
        ma, mb = self._manifest(self.resolve(a)), self._manifest(self.resolve(b))
        ta, tb = ma["tensors"], mb["tensors"]
        out = []
        for name in sorted(set(ta) | set(tb)):
            ea, eb = ta.get(name), tb.get(name)
            if ea is None:
                out.append(TensorDiff(name, "added", dtype_b=eb["dtype"], shape_b=tuple(eb["shape"])))
            elif eb is None:
                out.append(TensorDiff(name, "removed", dtype_a=ea["dtype"], shape_a=tuple(ea["shape"])))
            elif ea["content"] == eb["content"] and ea["dtype"] == eb["dtype"] and ea["shape"] == eb["shape"]:
                continue
            elif ea["dtype"] != eb["dtype"] or ea["shape"] != eb["shape"]:
                out.append(TensorDiff(name, "reshaped", ea["dtype"], eb["dtype"],
                                      tuple(ea["shape"]), tuple(eb["shape"])))
            else:
                with self._pool() as pool:
                    r = Reader(self.objects, pool, self.stats)
                    va = r.read({name: ea})[name]
                    vb = r.read({name: eb})[name]
                out.append(compare(name, va, vb))
        return out

    # ---------------------------------------------------------- maintenance

    def verify(self, ref: str | None = None) -> VerifyReport:
        """Read and hash every chunk of ``ref`` (or of every version); report problems.

        Also checks each manifest against its digest, each history record against its
        digest and against the ``parent_history`` its children recorded, and each
        delta's reconstruction against its content digest. Problems are collected, not
        raised. Versions written before history records existed are listed in
        ``report.unsealed`` (see ``seal_history``).
        """
        report = VerifyReport()
        digests = [self.resolve(ref)] if ref is not None else self.versions()
        good: set[str] = set()
        with self._pool() as pool:
            reader = Reader(self.objects, pool, self.stats)
            for digest in digests:
                report.versions.append(digest)
                try:
                    m = self._manifest(digest)
                except StoreIntegrityError as e:
                    report.errors.append(e)
                    continue
                self._verify_history(digest, m, report)
                for name, entry in m["tensors"].items():
                    self._verify_entry(reader, name, entry, good, report)
        return report

    def _verify_entry(self, reader: Reader, name: str, entry: dict[str, Any], good: set[str],
                      report: VerifyReport) -> None:
        if "delta" in entry:
            d = entry["delta"]
            n_errors = len(report.errors)
            for part in ("base", "U", "V"):
                self._verify_entry(reader, f"{name} (delta {part})", d[part.lower()], good, report)
            if len(report.errors) == n_errors:  # parts are sound: check the reconstruction
                try:
                    reader.read_delta(name, entry)
                except StoreIntegrityError as e:
                    report.errors.append(e)
            return
        try:
            check_dense_entry(name, entry)
        except StoreIntegrityError as e:
            report.errors.append(e)
            return
        todo = [(i, c) for i, c in enumerate(entry["chunks"]) if c not in good]
        size = int(entry["nbytes"])

        def check(item: tuple[int, str]) -> StoreIntegrityError | int:
            i, digest = item
            try:
                return len(reader.read_chunk(name, i, digest, min(CHUNK_SIZE, size - i * CHUNK_SIZE)))
            except StoreIntegrityError as e:
                return e

        for (_, digest), result in zip(todo, reader.pool.map(check, todo)):
            if isinstance(result, StoreIntegrityError):
                report.errors.append(result)
            elif digest not in good:
                good.add(digest)
                report.chunks_checked += 1
                report.bytes_checked += result

    def _verify_history(self, digest: str, m: dict[str, Any], report: VerifyReport) -> None:
        if not is_sealed(m):
            report.unsealed.append(digest)
            return
        problem = history_problem(m, digest)
        if problem:
            report.errors.append(StoreIntegrityError(problem, chunk=digest, reason="history edited"))
            return
        if m["parent"] is None:
            if m["parent_history"] is not None:
                report.errors.append(StoreIntegrityError(
                    f"version {digest[:12]} records a parent history but no parent",
                    chunk=digest, reason="history edited"))
            return
        try:
            pm = self._manifest(m["parent"])
        except RefError:
            return  # the parent is not in this store (log stops there too)
        except StoreIntegrityError:
            return  # reported where the parent itself is checked
        recorded = pm.get("history")
        if m["parent_history"] != recorded:
            report.errors.append(StoreIntegrityError(
                f"the history of version {m['parent'][:12]} was rewritten: its child "
                f"{digest[:12]} was committed on the record {str(m['parent_history'])[:12]}, "
                f"the parent now has {str(recorded)[:12]}", chunk=m["parent"],
                reason="history edited"))

    def seal_history(self) -> list[str]:
        """Give every version written before history records existed its record; return them.

        Migration for stores written by older tpmlab: version digests do not change (they
        name the weights), so every digest, tag and recorded result stays valid. Records
        are written parents first, so each child's record covers its parent's; a sealed
        child of a version sealed now is resealed to link to it. Holds the store's lock
        exclusive. What the old manifests say is taken as it is: check it before sealing.
        """
        with self.lock.hold(EXCLUSIVE):
            self._manifests.clear()
            manifests = {d: self._manifest(d) for d in self.versions()}
            resealed: list[str] = []
            history: dict[str, str] = {}
            changed: set[str] = set()
            for d in _parents_first(manifests):
                m, parent = manifests[d], manifests[d]["parent"]
                if parent in manifests:
                    parent_history = history.get(parent)
                else:  # a root, or a parent that is not in this store
                    parent_history = m.get("parent_history") if is_sealed(m) else None
                if not is_sealed(m) or parent in changed:
                    m = seal(m, d, parent_history)
                    self.objects.put("manifests", d, json.dumps(m, indent=1).encode())
                    resealed.append(d)
                    changed.add(d)
                history[d] = m["history"]
            self._manifests.clear()
        return resealed

    def referenced_chunks(self) -> set[str]:
        """Digests of every chunk some stored manifest references."""
        refs: set[str] = set()
        for digest in self.versions():
            m = self._manifest(digest)
            refs.update(c for _, c in manifest_chunks(m))
        return refs

    def gc(self, *, timeout: float | None = None) -> GcReport:
        """Delete chunks that no manifest references; report what was freed (bytes).

        Refuses to run if any manifest is unreadable (its chunks would look unreferenced).
        Holds the store's lock exclusive, so it waits for commits in flight (in any
        process) and commits wait for it; ``timeout`` (seconds) bounds the wait, then
        ``StoreLockedError``.
        """
        with self.lock.hold(EXCLUSIVE, timeout):
            keep = self.referenced_chunks()
            deleted = freed = kept = kept_bytes = 0
            for digest in list(self.objects.list("chunks")):
                try:
                    size = self.objects.size("chunks", digest)
                except KeyError:
                    continue
                if digest in keep:
                    kept += 1
                    kept_bytes += size
                else:
                    self.objects.delete("chunks", digest)
                    deleted += 1
                    freed += size
        return GcReport(chunks_deleted=deleted, bytes_freed=freed, chunks_kept=kept, bytes_kept=kept_bytes)

    def stored_bytes(self) -> int:
        """Total bytes of all chunks in the store (manifests and tags not counted)."""
        return sum(self.objects.size("chunks", d) for d in self.objects.list("chunks"))

    def entry_chunks(self, ref: str, name: str) -> list[str]:
        """Digests of every chunk tensor ``name`` of ``ref`` needs (delta bases and factors too)."""
        return list(iter_chunks(self._manifest(self.resolve(ref))["tensors"][name]))
