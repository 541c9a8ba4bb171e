"""``tpmlab gateway`` (serve) and ``tpmlab gateway-admin`` (users, keys, allocations).

Examples::

    tpmlab gateway --model tiny-llama --db sqlite:///gateway.db --port 8600 --admin alice
    tpmlab gateway --backend tls://scheduler:8786 --tls-ca-file ca.pem \\
        --tls-cert gateway.pem --tls-key gateway.key --hub-api http://127.0.0.1:8081/hub/api \\
        --db postgresql+psycopg://tpmlab@db/tpmlab
    tpmlab gateway-admin --db sqlite:///gateway.db add-user bob --tier inspect --units 5000
    tpmlab gateway-admin --db sqlite:///gateway.db add-key bob
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from .tiers import TIERS

if TYPE_CHECKING:
    from .core import GatewayConfig

DEFAULT_DB = "sqlite:///tpmlab-gateway.db"
# GatewayConfig's limits on one session request, each a flag (--max-session-traces, ...)
SESSION_LIMITS = ("max_session_traces", "max_session_invokes", "max_session_rows")
# ...and other GatewayConfig fields a flag of the same name sets, its default GatewayConfig's
OPTIONAL = (*SESSION_LIMITS, "max_read_values")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gateway", help="serve models to many users over HTTP "
                              "(authentication, tiers, quotas, cross-user batching)")
    p.add_argument("--backend", default="local",
                   help="'local' (models in this process) or a Dask scheduler address")
    p.add_argument("--model", action="append", dest="models", default=None,
                   help="a model to deploy (repeatable; default smollm2-135m)")
    p.add_argument("--stages", type=int, default=None, help="pipeline stages per model (Dask)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"SQLAlchemy URL of the ledger ({DEFAULT_DB})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--hub-api", default=os.environ.get("JUPYTERHUB_API_URL"),
                   help="JupyterHub API URL (e.g. http://127.0.0.1:8081/hub/api) to accept "
                   "JupyterHub tokens (default: $JUPYTERHUB_API_URL, set for Hub services)")
    p.add_argument("--hub-scope", default=None,
                   help="accept only Hub tokens with this scope (e.g. "
                   "access:services!service=tpmlab)")
    p.add_argument("--prefix", default=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/"),
                   help="URL path the gateway is served under (default: "
                   "$JUPYTERHUB_SERVICE_PREFIX, set for Hub services, else /)")
    p.add_argument("--hub-tier", default="query", choices=TIERS,
                   help="tier of JupyterHub users on first sight")
    p.add_argument("--hub-units", type=float, default=1000.0,
                   help="service units JupyterHub users get on first sight")
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--no-batching", action="store_true")
    p.add_argument("--max-batch-requests", type=int, default=32,
                   help="requests merged into one forward pass, at most (default 32)")
    p.add_argument("--max-batch-rows", type=int, default=64,
                   help="prompt rows of one merged pass, at most (default 64)")
    p.add_argument("--max-batch-cells", type=int, default=None,
                   help="rows x the longest row of one merged pass, at most (default: no bound)")
    p.add_argument("--min-batch-fill", type=float, default=0.0,
                   help="real tokens / (rows x the longest row) a merged pass keeps, at least "
                        "(default 0: any padding)")
    p.add_argument("--max-concurrent", type=int, default=8, help="requests in flight per user")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--cost-model", default=None, metavar="SECONDS,SECONDS_PER_TOKEN",
                   help="pin each model's cost model (seconds of a forward pass: fixed, per "
                   "token) instead of calibrating it at start, so prices do not move between "
                   "restarts or gateways")
    p.add_argument("--no-cost-learning", action="store_true",
                   help="keep the calibrated cost model (else the fastest solo runs lower it; "
                        "a --cost-model is pinned, never learned)")
    p.add_argument("--hold-lease", type=float, default=60.0,
                   help="seconds after which the holds of a gateway that stopped (crashed) are "
                   "released by the others")
    p.add_argument("--plan-compute-factor", type=float, default=8.0,
                   help="a plan's own compute held before it runs, in forward passes")
    p.add_argument("--max-session-traces", type=int, default=None,
                   help="traces in one session request (model.session()) (default: GatewayConfig's)")
    p.add_argument("--max-session-invokes", type=int, default=None,
                   help="invokes over all the traces of one session (default: GatewayConfig's)")
    p.add_argument("--max-session-rows", type=int, default=None,
                   help="prompt rows over all the traces of one session (default: GatewayConfig's)")
    p.add_argument("--remote-value-ttl", type=float, default=3600.0,
                   help="seconds a user's remote values (.save(remote=True)) are kept after "
                        "their request, unless released before")
    p.add_argument("--max-read-values", type=int, default=None,
                   help="remote values one read of several takes (default: GatewayConfig's)")
    p.add_argument("--tls-ca-file", default=None, help="CA of the Dask cluster's certificates")
    p.add_argument("--tls-cert", default=None, help="the gateway's certificate for Dask")
    p.add_argument("--tls-key", default=None, help="the gateway's private key for Dask")
    p.add_argument("--admin", default=None,
                   help="create this admin user if missing and print a new API key for it")
    p.add_argument("--forwarded-allow-ips", default=None,
                   help="addresses of proxies whose X-Forwarded-For names the client (whose "
                   "failed authentications are throttled); uvicorn's default: 127.0.0.1")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve_command)

    a = subparsers.add_parser("gateway-admin", help="manage the gateway's users, keys and units")
    a.add_argument("--db", default=DEFAULT_DB)
    asub = a.add_subparsers(dest="action", required=True)
    x = asub.add_parser("add-user")
    x.add_argument("name")
    x.add_argument("--tier", default="query", choices=TIERS)
    x.add_argument("--units", type=float, default=0.0)
    x = asub.add_parser("add-key")
    x.add_argument("name")
    x.add_argument("--label", default="")
    x = asub.add_parser("revoke-key")
    x.add_argument("key_id")
    x = asub.add_parser("grant")
    x.add_argument("name")
    x.add_argument("units", type=float)
    x.add_argument("--note", default="")
    x = asub.add_parser("set-tier")
    x.add_argument("name")
    x.add_argument("tier", choices=TIERS)
    x = asub.add_parser("users")
    x = asub.add_parser("usage")
    x.add_argument("name")
    x = asub.add_parser("audit", help="check that every balance equals its journals and is "
                        "not below zero")
    a.set_defaults(func=admin_command)


def make_backend(args: argparse.Namespace) -> Any:
    if args.backend == "local":
        from ..runtime.backend import LocalBackend

        return LocalBackend()
    from distributed import Client

    from ..cluster import DaskBackend

    security = None
    if args.tls_ca_file:
        from distributed.security import Security

        security = Security(tls_ca_file=args.tls_ca_file, tls_client_cert=args.tls_cert,
                            tls_client_key=args.tls_key, require_encryption=True)
    return DaskBackend(client=Client(args.backend, security=security))


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """The :class:`~tpmlab.gateway.core.GatewayConfig` that ``tpmlab gateway``'s flags say."""
    from .core import GatewayConfig

    models = args.models or ["smollm2-135m"]
    costs = {}
    if args.cost_model:
        from .units import CostModel

        fixed, per_token = (float(x) for x in args.cost_model.split(","))
        costs = {m: CostModel(fixed, per_token) for m in models}
    return GatewayConfig(models=models, batching=not args.no_batching,
                         batch_window=args.batch_window_ms / 1000.0,
                         max_batch_requests=args.max_batch_requests,
                         max_batch_rows=args.max_batch_rows,
                         max_batch_cells=args.max_batch_cells,
                         min_batch_fill=args.min_batch_fill,
                         max_concurrent_per_user=args.max_concurrent,
                         request_timeout=args.timeout, cost_models=costs,
                         learn_costs=not (args.cost_model or args.no_cost_learning),
                         hold_lease_seconds=args.hold_lease,
                         plan_compute_factor=args.plan_compute_factor,
                         remote_value_ttl=args.remote_value_ttl,
                         **{k: v for k in OPTIONAL
                            if (v := getattr(args, k)) is not None})


def serve_command(args: argparse.Namespace) -> int:
    from .app import create_app
    from .auth import HubSettings
    from .core import Gateway
    from .ledger import Ledger

    ledger = Ledger(args.db)
    if args.admin:
        ledger.ensure_user(args.admin, tier="admin", units=0.0)
        print(f"tpmlab gateway: API key for admin {args.admin!r}: {ledger.create_key(args.admin)}",
              flush=True)
    config = config_from_args(args)
    print(f"tpmlab gateway: deploying {config.models} on {args.backend} ...", flush=True)
    gateway = Gateway(make_backend(args), ledger, config)
    hub = HubSettings(args.hub_api, args.hub_tier, args.hub_units,
                      required_scope=args.hub_scope) if args.hub_api else None
    import uvicorn

    from .server import under_prefix

    print(f"tpmlab gateway: serving on http://{args.host}:{args.port}{args.prefix}", flush=True)
    uvicorn.run(under_prefix(create_app(gateway, hub=hub), args.prefix),
                host=args.host, port=args.port,
                log_level=args.log_level, forwarded_allow_ips=args.forwarded_allow_ips)
    return 0


def admin_command(args: argparse.Namespace) -> int:
    from .ledger import Ledger, LedgerError

    ledger = Ledger(args.db)
    try:
        if args.action == "add-user":
            u = ledger.create_user(args.name, args.tier, units=args.units)
            out: Any = {"name": u.name, "tier": u.tier, "balance": ledger.balance(u.name)}
        elif args.action == "add-key":
            out = {"user": args.name, "key": ledger.create_key(args.name, args.label)}
        elif args.action == "revoke-key":
            ledger.revoke_key(args.key_id)
            out = {"revoked": args.key_id}
        elif args.action == "grant":
            out = {"name": args.name, "balance": ledger.allocate(args.name, args.units, args.note)}
        elif args.action == "set-tier":
            u = ledger.set_tier(args.name, args.tier)
            out = {"name": u.name, "tier": u.tier}
        elif args.action == "users":
            out = [{"name": u.name, "tier": u.tier, "source": u.source, "active": u.active,
                    "balance": ledger.balance(u.name)} for u in ledger.users()]
        elif args.action == "audit":
            out = {"problems": ledger.audit()}
        else:
            out = {**ledger.totals(args.name), "charges": ledger.charges(args.name)}
    except LedgerError as e:
        print(f"tpmlab gateway-admin: {e}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print(json.dumps(out, indent=2))
    return 0
