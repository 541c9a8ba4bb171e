"""``tpmlab hub-config``: the ``jupyterhub_config.py`` fragment that runs tpmlab on a Hub.

What it configures, and why:

* **The gateway as a Hub-managed service** named ``tpmlab``: the Hub starts
  ``tpmlab gateway`` on a loopback port and routes ``<hub>/services/tpmlab/`` to it. The
  gateway learns the Hub's API URL and its URL prefix from the environment the Hub gives
  its services (``$JUPYTERHUB_API_URL``, ``$JUPYTERHUB_SERVICE_PREFIX``) and checks each
  user's token with the Hub (``GET /hub/api/user``).
* **Roles and scopes**: a token reaches the gateway only if it carries
  ``access:services!service=tpmlab``. The fragment grants that scope to the ``user`` role
  (tokens users make themselves) and to the ``server`` role (the token every single-user
  server gets as ``$JUPYTERHUB_API_TOKEN``), beside JupyterHub's default scopes of each
  role (``--grant`` adds more, e.g. dask-gateway's service). The service itself gets no
  role: it reads nothing from the Hub with its own token.
* **The single-user environment**: ``$TPMLAB_GATEWAY`` (the service through the Hub's
  proxy) for the sidebar's usage panel and for ``tpmlab.connect()`` in kernels, which then
  authenticate with the server's own Hub token: no token is written anywhere.
  JupyterLab opens by default; tpmlab's server extension and sidebar come with the package
  (``pip install 'tpmlab[lab]'`` in the single-user environment).

``docs/admin.md`` shows :func:`render` of the defaults, word for word (a test checks it).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE = "tpmlab"
# JupyterHub's own default scopes of these roles (jupyterhub.roles), kept when adding ours
USER_ROLE_SCOPES = ("self",)
SERVER_ROLE_SCOPES = ("users:activity!user", "access:servers!server")


def service_scope(name: str = SERVICE) -> str:
    """The scope a Hub token needs to reach the gateway service ``name``."""
    return f"access:services!service={name}"


@dataclass
class HubConfig:
    """What the fragment depends on; the defaults are the documented deployment."""

    public_url: str = "http://127.0.0.1:8000"  # where users' kernels reach the Hub's proxy
    port: int = 8600  # the gateway's loopback port
    db: str = "sqlite:////srv/tpmlab/ledger.db"
    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    hub_tier: str = "inspect"  # every Hub user's tier on first sight
    hub_units: float = 1000.0  # and their first allocation of service units
    service: str = SERVICE
    command: list[str] = field(default_factory=lambda: ["tpmlab"])
    environment: dict[str, str] = field(default_factory=dict)  # for the gateway and servers
    start_timeout: int = 600  # seconds the Hub waits for the gateway to load its models
    # more scopes for users' and servers' tokens, e.g. access:services!service=dask-gateway
    grants: list[str] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        """The gateway as single-user servers reach it: through the Hub's proxy."""
        return f"{self.public_url.rstrip('/')}/services/{self.service}"

    def gateway_command(self) -> list[str]:
        cmd = [*self.command, "gateway", "--host", "127.0.0.1", "--port", str(self.port),
               "--db", self.db]
        for m in self.models:
            cmd += ["--model", m]
        units = f"{self.hub_units:g}"
        return cmd + ["--hub-tier", self.hub_tier, "--hub-units", units,
                      "--hub-scope", service_scope(self.service)]


def render(cfg: HubConfig | None = None) -> str:
    """The ``jupyterhub_config.py`` fragment, as Python source."""
    cfg = cfg or HubConfig()
    service: dict[str, Any] = {"name": cfg.service, "url": f"http://127.0.0.1:{cfg.port}",
                               "command": cfg.gateway_command(),
                               "timeout": cfg.start_timeout}
    if cfg.environment:
        service["environment"] = dict(cfg.environment)
    scopes = [service_scope(cfg.service), *cfg.grants]
    roles = [{"name": "user", "scopes": [*USER_ROLE_SCOPES, *scopes]},
             {"name": "server", "scopes": [*SERVER_ROLE_SCOPES, *scopes]}]
    env = {**cfg.environment, "TPMLAB_GATEWAY": cfg.gateway_url}
    lines = [
        "# tpmlab: the multi-user gateway as a Hub-managed service (`tpmlab hub-config`)",
        "c.JupyterHub.services.append(" + _py(service, 4) + ")",
        "# Hub tokens reach the gateway only with this scope: users' own tokens and the",
        "# token of each single-user server ($JUPYTERHUB_API_TOKEN), nothing else.",
        "c.JupyterHub.load_roles.extend(" + _py(roles, 4) + ")",
        "# Single-user servers: the sidebar and tpmlab.connect() use the gateway with the",
        "# server's own Hub token.",
        "c.Spawner.environment.update(" + _py(env, 4) + ")",
        'c.Spawner.default_url = "/lab"',
    ]
    return "\n".join(lines) + "\n"


def _py(value: Any, indent: int, level: int = 0) -> str:
    """``value`` (dicts, lists, strings, numbers) as Python source, one item a line."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(value, dict) and value:
        items = [f"{inner}{_str(k)}: {_py(v, indent, level + 1)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
        items = [f"{inner}{_py(v, indent, level + 1)}," for v in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    if isinstance(value, list):
        return "[" + ", ".join(_str(v) for v in value) + "]"
    if isinstance(value, str):
        return _str(value)
    return repr(value)


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the command ----------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    d = HubConfig()
    p = subparsers.add_parser(
        "hub-config", help="write the jupyterhub_config.py fragment that runs the tpmlab "
        "gateway as a Hub service and sets up the single-user servers")
    p.add_argument("--public-url", default=d.public_url,
                   help="the Hub's URL as single-user servers reach it")
    p.add_argument("--port", type=int, default=d.port, help="the gateway's loopback port")
    p.add_argument("--db", default=d.db, help="the gateway's ledger (SQLAlchemy URL)")
    p.add_argument("--model", action="append", dest="models", default=None,
                   help=f"a model the gateway serves (repeatable; default {d.models[0]})")
    p.add_argument("--hub-tier", default=d.hub_tier, help="Hub users' tier on first sight")
    p.add_argument("--hub-units", type=float, default=d.hub_units,
                   help="Hub users' service units on first sight")
    p.add_argument("--service", default=d.service, help="the service's name (its URL path)")
    p.add_argument("--command", default=None,
                   help="how the Hub runs tpmlab (default 'tpmlab'; e.g. "
                   "'/opt/tpmlab/bin/python -m tpmlab.cli')")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the gateway and the single-user servers "
                   "(repeatable; e.g. TPMLAB_HOME=/srv/tpmlab/weights)")
    p.add_argument("--grant", action="append", default=[], metavar="SCOPE",
                   help="one more scope for users' and single-user servers' tokens "
                   "(repeatable; e.g. access:services!service=dask-gateway)")
    p.add_argument("-o", "--output", default=None, help="write here instead of printing")
    p.set_defaults(func=command)


def config_from_args(args: argparse.Namespace) -> HubConfig:
    from .errors import HubConfigError

    env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise HubConfigError(f"--env takes NAME=VALUE; got {item!r}")
        env[name] = value
    return HubConfig(public_url=args.public_url, port=args.port, db=args.db,
                     models=args.models or HubConfig().models, hub_tier=args.hub_tier,
                     hub_units=args.hub_units, service=args.service,
                     command=shlex.split(args.command) if args.command else ["tpmlab"],
                     environment=env, grants=list(args.grant))


def command(args: argparse.Namespace) -> int:
    text = render(config_from_args(args))
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    return 0
