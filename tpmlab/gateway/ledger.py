"""The gateway's ledger: users, API keys, allocations, holds and per-request charges in SQL.

SQLAlchemy 2 over any database it speaks; SQLite (``sqlite:///path``) by default,
PostgreSQL (``postgresql+psycopg://user@host:port/db``) for a shared deployment.
Nothing about money lives outside the database, so several gateways may share one.

**Balances.** Allocations and charges are journals (one row each). Every user also has
one *account* row holding three running totals, in integer micro service units so that
sums are exact: ``allocated``, ``charged`` and ``held`` (the holds of requests in flight).
The journals and the totals change in the same transaction, so
``balance = allocated - charged`` always equals the journals' sums (:meth:`Ledger.audit`
checks it). A request is admitted by **one conditional UPDATE**::

    UPDATE gateway_accounts SET held = held + :hold
     WHERE user_id = :user AND allocated - charged - held >= :hold

which the database applies atomically (PostgreSQL re-checks the condition on the row's
latest version after waiting for its lock; SQLite serializes writers), together with a
row in ``gateway_reservations`` naming the request, the gateway holding it and when the
hold expires. When the request ends, the hold becomes a charge of at most the hold (or
is released if nothing is charged) in one transaction. So however many gateways admit
requests at once, ``charged + held <= allocated`` holds at every commit and no balance
goes below zero.

**Crashed gateways.** Each gateway renews the expiry of the holds of its requests in
flight every few seconds; a hold not renewed for ``lease`` seconds (its gateway died)
is released by whichever gateway next runs :meth:`Ledger.expire`.

**Accounts of each source are apart.** A user's identity is its source and its name:
API-key users have plain names (``alice``, letters, digits and ``_.@+-``), JupyterHub
users are named ``hub:<hub name>``, so a JupyterHub login never reaches a key-based
account of the same name.

API keys look like ``tpmk_<key id>_<secret>``: the key id finds the row, the
secret (32 random bytes) is stored only as ``sha256(salt || secret)`` with a
per-key random salt, and is compared in constant time. A slow password hash adds
nothing for a 256-bit random secret and would cost every request milliseconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import LedgerError
from .tiers import TIERS

KEY_PREFIX = "tpmk_"
HUB_PREFIX = "hub:"
# Names of key-based users: no ':' so that they never collide with "hub:<name>".
USER_NAME_PATTERN = r"^[A-Za-z0-9_.@+-]{1,200}$"
MICRO = 1_000_000  # the ledger counts in micro service units (exact integer sums)


def to_micro(units: float) -> int:
    return int(round(float(units) * MICRO))


def from_micro(micro: int) -> float:
    return micro / MICRO


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "gateway_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    tier: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(20), default="key")  # "key" | "hub"
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiKey(Base):
    __tablename__ = "gateway_api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("gateway_users.id"), index=True)
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Allocation(Base):
    __tablename__ = "gateway_allocations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("gateway_users.id"), index=True)
    units: Mapped[float] = mapped_column(Float)
    note: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Charge(Base):
    __tablename__ = "gateway_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("gateway_users.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(100))
    plan_digest: Mapped[str] = mapped_column(String(100))
    mode: Mapped[str] = mapped_column(String(20))
    tokens: Mapped[int] = mapped_column(Integer)
    bytes_returned: Mapped[int] = mapped_column(Integer)
    compute_seconds: Mapped[float] = mapped_column(Float)  # the request's own (units.py)
    measured_seconds: Mapped[float] = mapped_column(Float)  # the engine's run, batch included
    batch_size: Mapped[int] = mapped_column(Integer)
    units: Mapped[float] = mapped_column(Float)  # charged: never more than the request's hold
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class Account(Base):
    """A user's running totals in micro service units (see the module docstring)."""

    __tablename__ = "gateway_accounts"
    user_id: Mapped[int] = mapped_column(ForeignKey("gateway_users.id"), primary_key=True)
    allocated: Mapped[int] = mapped_column(BigInteger, default=0)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    held: Mapped[int] = mapped_column(BigInteger, default=0)


class Reservation(Base):
    """The hold of one request in flight: ``units`` (micro) held until ``expires_at``
    (seconds since the epoch) unless the gateway ``gateway`` renews it."""

    __tablename__ = "gateway_reservations"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("gateway_users.id"), index=True)
    units: Mapped[int] = mapped_column(BigInteger)
    gateway: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class UserView:
    id: int
    name: str
    tier: str
    source: str
    active: bool


@dataclass(frozen=True)
class Admission:
    """The answer to :meth:`Ledger.reserve`: whether the hold was taken, and the account as
    it stood (service units) for a refusal's message."""

    admitted: bool
    balance: float
    held: float

    @property
    def available(self) -> float:
        return self.balance - self.held


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def hub_account_name(hub_name: str) -> str:
    """The ledger name of the JupyterHub user ``hub_name``."""
    return HUB_PREFIX + hub_name


class Ledger:
    """All reads and writes of the gateway's database."""

    def __init__(self, url: str = "sqlite:///tpmlab-gateway.db", *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite") and ":memory:" not in url and url not in ("sqlite://",
                                                                                "sqlite:///"):
            event.listen(self.engine, "connect", _sqlite_wal)
        try:
            Base.metadata.create_all(self.engine)
        except SQLAlchemyError:  # another gateway created the tables at the same moment
            Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._open_accounts()

    def close(self) -> None:
        self.engine.dispose()

    # -- users ------------------------------------------------------------------------------------
    def create_user(self, name: str, tier: str = "query", *, units: float = 0.0,
                    source: str = "key", note: str = "initial allocation") -> UserView:
        if tier not in TIERS:
            raise LedgerError(f"tier {tier!r} is not one of {list(TIERS)}")
        if source == "key" and not re.match(USER_NAME_PATTERN, name or ""):
            raise LedgerError(f"user name {name!r} must be 1 to 200 letters, digits or _.@+-")
        if source == "hub" and not (name.startswith(HUB_PREFIX) and 0 < len(name) <= 200):
            raise LedgerError(f"a JupyterHub account's name must be '{HUB_PREFIX}<name>' "
                              "(at most 200 characters)")
        micro = to_micro(units)
        if micro < 0:
            raise LedgerError("an initial allocation cannot be negative")
        with self._session.begin() as s:
            user = User(name=name, tier=tier, source=source, active=True)
            s.add(user)
            try:
                s.flush()
            except IntegrityError:
                raise LedgerError(f"user {name!r} exists already") from None
            s.add(Account(user_id=user.id, allocated=micro, charged=0, held=0))
            if micro:
                s.add(Allocation(user_id=user.id, units=from_micro(micro), note=note))
            return _view(user)

    def user(self, name: str) -> UserView | None:
        with self._session() as s:
            user = s.scalar(select(User).where(User.name == name))
            return _view(user) if user else None

    def ensure_user(self, name: str, *, tier: str, units: float, source: str = "key") -> UserView:
        """The key-based user ``name``, created with ``tier`` and ``units`` on first sight."""
        if source != "key":
            raise LedgerError("JupyterHub accounts are made by hub_user()")
        found = self.user(name)
        if found is not None:
            if found.source != "key":
                raise LedgerError(f"{name!r} is a {found.source} account, not a key-based one")
            return found
        try:
            return self.create_user(name, tier, units=units, source="key")
        except LedgerError:  # created meanwhile by another request
            found = self.user(name)
            if found is None or found.source != "key":
                raise
            return found

    def hub_user(self, hub_name: str, *, tier: str, units: float) -> UserView:
        """The account of the JupyterHub user ``hub_name`` (``hub:<hub_name>``), created with
        ``tier`` and ``units`` on first sight; never a key-based account of the same name."""
        name = hub_account_name(hub_name)
        for _ in range(2):
            found = self.user(name)
            if found is not None:
                return found
            # an account made before hub accounts had their prefix: same name, source "hub"
            legacy = self.user(hub_name)
            if legacy is not None and legacy.source == "hub":
                return legacy
            try:
                return self.create_user(name, tier, units=units, source="hub",
                                        note="JupyterHub user on first sight")
            except LedgerError:  # created meanwhile by another request
                continue
        raise LedgerError(f"could not create the account {name!r}")

    def users(self) -> list[UserView]:
        with self._session() as s:
            return [_view(u) for u in s.scalars(select(User).order_by(User.id))]

    def set_tier(self, name: str, tier: str) -> UserView:
        if tier not in TIERS:
            raise LedgerError(f"tier {tier!r} is not one of {list(TIERS)}")
        with self._session.begin() as s:
            user = self._get(s, name)
            user.tier = tier
            return _view(user)

    def set_active(self, name: str, active: bool) -> UserView:
        with self._session.begin() as s:
            user = self._get(s, name)
            user.active = active
            return _view(user)

    @staticmethod
    def _get(s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise LedgerError(f"no user {name!r}")
        return user

    # -- keys -------------------------------------------------------------------------------------
    def create_key(self, name: str, label: str = "") -> str:
        """A new API key for user ``name``; the whole key is returned only here."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        with self._session.begin() as s:
            user = self._get(s, name)
            s.add(ApiKey(id=key_id, user_id=user.id, salt=salt, digest=_hash(salt, secret),
                         label=label))
        return f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke_key(self, key_id: str) -> None:
        with self._session.begin() as s:
            key = s.get(ApiKey, key_id)
            if key is None:
                raise LedgerError(f"no key {key_id!r}")
            key.revoked = True

    def keys(self, name: str) -> list[dict]:
        with self._session() as s:
            user = self._get(s, name)
            rows = s.scalars(select(ApiKey).where(ApiKey.user_id == user.id))
            return [{"id": k.id, "label": k.label, "revoked": k.revoked,
                     "created_at": k.created_at.isoformat()} for k in rows]

    def check_key(self, token: str) -> UserView | None:
        """The active user a key belongs to, or None (unknown, revoked, wrong secret)."""
        if not token.startswith(KEY_PREFIX):
            return None
        key_id, sep, secret = token[len(KEY_PREFIX):].partition("_")
        if not sep or not key_id or not secret or len(key_id) > 32:
            return None
        with self._session() as s:
            key = s.get(ApiKey, key_id)
            if key is None:
                _hash("00" * 16, secret)  # same work whether or not the id exists
                return None
            good = hmac.compare_digest(_hash(key.salt, secret), key.digest)
            if not good or key.revoked:
                return None
            user = s.get(User, key.user_id)
            return _view(user) if user is not None and user.active else None

    # -- balances ---------------------------------------------------------------------------------
    def allocate(self, name: str, units: float, note: str = "") -> float:
        """Add ``units`` to a user's allocation (negative: take back, never below what the
        user has used and holds); the new balance."""
        micro = to_micro(units)
        with self._session.begin() as s:
            user = self._get(s, name)
            done = s.execute(
                update(Account).where(Account.user_id == user.id,
                                      Account.allocated + micro - Account.charged
                                      - Account.held >= 0)
                .values(allocated=Account.allocated + micro)).rowcount
            if done != 1:
                acct = s.get(Account, user.id)
                raise LedgerError(
                    f"taking back {-units:g} units would leave {name!r} below zero (balance "
                    f"{from_micro(acct.allocated - acct.charged):g}, held by requests in "
                    f"flight {from_micro(acct.held):g})")
            s.add(Allocation(user_id=user.id, units=from_micro(micro), note=note))
        return self.balance(name)

    def balance(self, name: str) -> float:
        """Allocations minus charges (holds of requests in flight not subtracted)."""
        return self.totals(name)["balance"]

    def totals(self, name: str) -> dict:
        """``allocated``, ``used``, ``balance``, ``held`` (service units), ``requests``."""
        with self._session() as s:
            user = self._get(s, name)
            acct = s.get(Account, user.id)
            n = s.scalar(select(func.count(Charge.id)).where(Charge.user_id == user.id))
            return {"allocated": from_micro(acct.allocated), "used": from_micro(acct.charged),
                    "requests": int(n), "balance": from_micro(acct.allocated - acct.charged),
                    "held": from_micro(acct.held)}

    # -- holds and charges ------------------------------------------------------------------------
    def reserve(self, user_id: int, request_id: str, units: float, *, gateway: str,
                lease: float) -> Admission:
        """Hold ``units`` for a request if the user's balance minus what is held covers them,
        in one atomic conditional update; nothing is held when it does not."""
        micro = max(to_micro(units), 0)
        with self._session.begin() as s:
            done = s.execute(
                update(Account).where(Account.user_id == user_id,
                                      Account.allocated - Account.charged - Account.held
                                      >= micro)
                .values(held=Account.held + micro)).rowcount
            if done == 1:
                s.add(Reservation(request_id=request_id, user_id=user_id, units=micro,
                                  gateway=gateway, expires_at=time.time() + lease))
            acct = s.get(Account, user_id)
            if acct is None:
                raise LedgerError(f"no account for user id {user_id}")
            return Admission(done == 1, from_micro(acct.allocated - acct.charged),
                             from_micro(acct.held))

    def settle(self, charges: Iterable[dict]) -> dict[str, float]:
        """Turn the holds of finished requests into charges, in one transaction.

        Each row has ``request_id``, ``user_id``, ``units`` (what the request cost) and
        the other :class:`Charge` columns. A request is charged at most its hold (the hold
        is the cap); if its hold is gone (expired while the database was unreachable) at
        most what the user has free. Returns ``{request id: units charged}``."""
        out: dict[str, float] = {}
        with self._session.begin() as s:
            for row in charges:
                row = dict(row)
                rid, uid = row["request_id"], row["user_id"]
                cost = max(to_micro(row.pop("units")), 0)
                held = s.execute(delete(Reservation).where(Reservation.request_id == rid)
                                 .returning(Reservation.units)).scalar()
                if held is not None:
                    charge = min(cost, held)
                    s.execute(update(Account).where(Account.user_id == uid).values(
                        held=Account.held - held, charged=Account.charged + charge))
                else:
                    acct = s.execute(select(Account).where(Account.user_id == uid)
                                     .with_for_update()).scalar_one()
                    charge = max(min(cost, acct.allocated - acct.charged - acct.held), 0)
                    acct.charged += charge
                s.add(Charge(**row, units=from_micro(charge)))
                out[rid] = from_micro(charge)
        return out

    def release(self, request_ids: Iterable[str]) -> int:
        """Release the holds of requests that end without a charge; how many there were."""
        n = 0
        with self._session.begin() as s:
            for rid in request_ids:
                n += self._release(s, delete(Reservation).where(Reservation.request_id == rid))
        return n

    def renew(self, gateway: str, request_ids: list[str], lease: float) -> None:
        """Push back the expiry of this gateway's holds of requests still in flight."""
        until = time.time() + lease
        with self._session.begin() as s:
            for i in range(0, len(request_ids), 500):
                s.execute(update(Reservation).where(
                    Reservation.gateway == gateway,
                    Reservation.request_id.in_(request_ids[i:i + 500])).values(expires_at=until))

    def expire(self, now: float | None = None) -> int:
        """Release holds whose gateway stopped renewing them; how many there were."""
        now = time.time() if now is None else now
        with self._session() as s:
            stale = list(s.scalars(select(Reservation.request_id)
                                   .where(Reservation.expires_at < now).limit(1000)))
        n = 0
        with self._session.begin() as s:
            for rid in stale:  # each still expired at the moment it is deleted
                n += self._release(s, delete(Reservation).where(
                    Reservation.request_id == rid, Reservation.expires_at < now))
        return n

    def release_gateway(self, gateway: str) -> int:
        """Release every hold of ``gateway`` (it is shutting down)."""
        with self._session() as s:
            ids = list(s.scalars(select(Reservation.request_id)
                                 .where(Reservation.gateway == gateway)))
        return self.release(ids)

    @staticmethod
    def _release(s: Session, stmt) -> int:
        row = s.execute(stmt.returning(Reservation.units, Reservation.user_id)).first()
        if row is None:
            return 0
        s.execute(update(Account).where(Account.user_id == row.user_id)
                  .values(held=Account.held - row.units))
        return 1

    def holds(self, name: str) -> list[dict]:
        with self._session() as s:
            user = self._get(s, name)
            rows = s.scalars(select(Reservation).where(Reservation.user_id == user.id))
            return [{"request_id": r.request_id, "units": from_micro(r.units),
                     "gateway": r.gateway, "expires_at": r.expires_at} for r in rows]

    def charges(self, name: str, limit: int = 100) -> list[dict]:
        with self._session() as s:
            user = self._get(s, name)
            rows = s.scalars(select(Charge).where(Charge.user_id == user.id)
                             .order_by(Charge.id.desc()).limit(limit))
            return [{"request_id": c.request_id, "model": c.model, "mode": c.mode,
                     "tokens": c.tokens, "bytes_returned": c.bytes_returned,
                     "compute_seconds": c.compute_seconds,
                     "measured_seconds": c.measured_seconds, "batch_size": c.batch_size,
                     "units": c.units, "plan_digest": c.plan_digest,
                     "created_at": c.created_at.isoformat()} for c in rows]

    def audit(self) -> list[str]:
        """Accounts whose totals disagree with the journals, or that are below zero
        (empty when the ledger is consistent)."""
        problems = []
        with self._session() as s:
            granted = dict(s.execute(select(Allocation.user_id, func.sum(Allocation.units))
                                     .group_by(Allocation.user_id)).all())
            used = dict(s.execute(select(Charge.user_id, func.sum(Charge.units))
                                  .group_by(Charge.user_id)).all())
            held = dict(s.execute(select(Reservation.user_id, func.sum(Reservation.units))
                                  .group_by(Reservation.user_id)).all())
            for acct in s.scalars(select(Account)):
                uid = acct.user_id
                for what, total, journal in (
                        ("allocated", acct.allocated, to_micro(granted.get(uid) or 0.0)),
                        ("charged", acct.charged, to_micro(used.get(uid) or 0.0)),
                        ("held", acct.held, int(held.get(uid) or 0))):
                    if abs(total - journal) > 1 + 1e-9 * abs(journal):
                        problems.append(f"user {uid}: {what} {total} != journal {journal}")
                if acct.charged + acct.held > acct.allocated:
                    problems.append(f"user {uid}: charged {acct.charged} + held {acct.held} "
                                    f"exceed allocated {acct.allocated}")
        return problems

    # -- accounts of users made before accounts existed -------------------------------------------
    def _open_accounts(self) -> None:
        """Give every user without an account one, with totals summed from the journals
        (databases written by earlier versions)."""
        with self._session() as s:
            missing = list(s.scalars(select(User.id).where(
                ~select(Account.user_id).where(Account.user_id == User.id).exists())))
        for uid in missing:
            try:
                with self._session.begin() as s:
                    granted = s.scalar(select(func.coalesce(func.sum(Allocation.units), 0.0))
                                       .where(Allocation.user_id == uid))
                    used = s.scalar(select(func.coalesce(func.sum(Charge.units), 0.0))
                                    .where(Charge.user_id == uid))
                    s.add(Account(user_id=uid, allocated=to_micro(granted),
                                  charged=to_micro(used), held=0))
            except IntegrityError:  # another gateway opened it at the same moment
                pass


def _sqlite_wal(dbapi_connection, _record) -> None:
    """SQLite in write-ahead-log mode: readers never wait for the writer, and a commit is an
    append without an fsync (synchronous=NORMAL: the database stays consistent on power
    loss, which may take back the last commits). Every gateway admits and settles with a
    commit, so this is their throughput. Works between processes of one host, not over a
    network file system (use PostgreSQL there)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _view(user: User) -> UserView:
    return UserView(id=user.id, name=user.name, tier=user.tier, source=user.source,
                    active=user.active)
