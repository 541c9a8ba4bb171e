"""The gateway's ledger: users, API keys, allocations and per-request charges in SQL.

SQLAlchemy 2 over any database it speaks; SQLite (``sqlite:///path``) by default,
PostgreSQL (``postgresql+psycopg://user@host:port/db``) for a shared deployment.
A user's balance is the sum of their allocations minus the sum of their charges;
nothing is cached outside the database, so several gateways may share one.

API keys look like ``tpmk_<key id>_<secret>``: the key id finds the row, the
secret (32 random bytes) is stored only as ``sha256(salt || secret)`` with a
per-key random salt, and is compared in constant time. A slow password hash adds
nothing for a 256-bit random secret and would cost every request milliseconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    create_engine,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .tiers import TIERS

KEY_PREFIX = "tpmk_"


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
    compute_seconds: Mapped[float] = mapped_column(Float)  # charged (see tpmlab.gateway.units)
    measured_seconds: Mapped[float] = mapped_column(Float)  # the engine's run, batch included
    batch_size: Mapped[int] = mapped_column(Integer)
    units: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class UserView:
    id: int
    name: str
    tier: str
    source: str
    active: bool


class LedgerError(Exception):
    """A ledger operation that cannot be done (unknown user, duplicate name...)."""


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


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
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- users ------------------------------------------------------------------------------------
    def create_user(self, name: str, tier: str = "query", *, units: float = 0.0,
                    source: str = "key", note: str = "initial allocation") -> UserView:
        if tier not in TIERS:
            raise LedgerError(f"tier {tier!r} is not one of {list(TIERS)}")
        if not name or len(name) > 200:
            raise LedgerError("a user name must have 1 to 200 characters")
        with self._session.begin() as s:
            user = User(name=name, tier=tier, source=source, active=True)
            s.add(user)
            try:
                s.flush()
            except IntegrityError:
                raise LedgerError(f"user {name!r} exists already") from None
            if units:
                s.add(Allocation(user_id=user.id, units=float(units), note=note))
            return _view(user)

    def user(self, name: str) -> UserView | None:
        with self._session() as s:
            user = s.scalar(select(User).where(User.name == name))
            return _view(user) if user else None

    def ensure_user(self, name: str, *, tier: str, units: float, source: str) -> UserView:
        """The user of that name, created with ``tier`` and ``units`` on first sight."""
        found = self.user(name)
        if found is not None:
            return found
        try:
            return self.create_user(name, tier, units=units, source=source)
        except LedgerError:  # created meanwhile by another request
            found = self.user(name)
            if found is None:
                raise
            return found

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

    # -- units ------------------------------------------------------------------------------------
    def allocate(self, name: str, units: float, note: str = "") -> float:
        """Add ``units`` (negative to take back) to a user's allocation; the new balance."""
        with self._session.begin() as s:
            user = self._get(s, name)
            s.add(Allocation(user_id=user.id, units=float(units), note=note))
        return self.balance(name)

    def balance(self, name: str) -> float:
        with self._session() as s:
            user = self._get(s, name)
            granted = s.scalar(select(func.coalesce(func.sum(Allocation.units), 0.0))
                               .where(Allocation.user_id == user.id))
            used = s.scalar(select(func.coalesce(func.sum(Charge.units), 0.0))
                            .where(Charge.user_id == user.id))
            return float(granted) - float(used)

    def record_charges(self, rows: list[dict]) -> None:
        """Record charges in one transaction; each row has ``user_id`` and the
        :class:`Charge` columns (``request_id``, ``model``, ``units``...)."""
        if not rows:
            return
        with self._session.begin() as s:
            for row in rows:
                s.add(Charge(**row))

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

    def totals(self, name: str) -> dict:
        with self._session() as s:
            user = self._get(s, name)
            granted = s.scalar(select(func.coalesce(func.sum(Allocation.units), 0.0))
                               .where(Allocation.user_id == user.id))
            used, n = s.execute(select(func.coalesce(func.sum(Charge.units), 0.0),
                                       func.count(Charge.id))
                                .where(Charge.user_id == user.id)).one()
            return {"allocated": float(granted), "used": float(used), "requests": int(n),
                    "balance": float(granted) - float(used)}


def _view(user: User) -> UserView:
    return UserView(id=user.id, name=user.name, tier=user.tier, source=user.source,
                    active=user.active)
