"""The ``tpmlab`` command: ``demo``, ``lab`` and the subcommands other parts register."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"


def demo(prompt: str, model_name: str, top_k: int, address: str | None) -> str:
    """Layer by layer, the top tokens at the last position (logit lens), as a text table."""
    import tpmlab

    lab = tpmlab.connect(address or "local")
    model = lab.model(model_name)
    with model.trace(prompt):
        tops = []
        for layer in model.layers:
            probs = model.unembed(model.final_norm(layer.output[:, -1])).softmax(-1)
            tops.append(probs.topk(top_k).save())
    tok = model.tokenizer
    width = 14
    lines = [f"prompt: {prompt!r}   model: {model.name} ({model.version[:19]})",
             f"{'layer':>5}  " + "  ".join(f"{'top ' + str(i + 1):<{width + 7}}" for i in range(top_k))]
    for i, top in enumerate(tops):
        values, indices = top.value
        cells = [f"{tok.decode([int(t)])!r:<{width}} {float(p):6.1%}"
                 for p, t in zip(values[0], indices[0])]
        lines.append(f"{i:>5}  " + "  ".join(cells))
    lab.close()
    return "\n".join(lines)


def jupyter_command(args: argparse.Namespace) -> list[str]:
    """The JupyterLab command line ``tpmlab lab`` runs."""
    notebooks = Path(args.notebook_dir or Path.cwd() / "notebooks")
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--ip={args.ip}", f"--port={args.port}",
           f"--notebook-dir={notebooks if notebooks.exists() else Path.cwd()}"]
    if args.no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and HPC nodes often run as root
        cmd.append("--allow-root")
    return cmd


def lab_command(args: argparse.Namespace) -> int:
    """The main job: a local Dask cluster with the default model deployed as pipeline stages,
    and JupyterLab on this machine's loopback whose kernels and sidebar attach to it."""
    from .cluster.embedded import start_local_cluster
    from .lab import connect

    print(f"tpmlab: starting a local Dask cluster and deploying {args.model} "
          f"as {args.stages} stage(s) ...", flush=True)
    cluster = start_local_cluster(dashboard_address="127.0.0.1:0")
    lab = connect(cluster.scheduler_address)
    try:
        model = lab.model(args.model, stages=args.stages)
        print(f"tpmlab: {model!r} on {cluster.scheduler_address}; dashboard "
              f"{cluster.dashboard_link}", flush=True)
        # Kernels started by this JupyterLab inherit the address: tpmlab.connect() attaches.
        env = {**os.environ, "TPMLAB_SCHEDULER": cluster.scheduler_address}
        return subprocess.call(jupyter_command(args), env=env)
    finally:
        lab.close()
        cluster.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpmlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="layer by layer top tokens for a prompt (logit lens)")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--address", default=None,
                   help="a Dask scheduler (tcp://host:port); default: run in this process")

    p = sub.add_parser("lab", help="a local Dask cluster with the default model, and JupyterLab")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--ip", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8888)
    p.add_argument("--notebook-dir", default=None)
    p.add_argument("--no-browser", action="store_true")

    for module in ("tpmlab.store.cli", "tpmlab.gateway.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print(demo(args.prompt, args.model, args.top_k, args.address))
        return 0
    if args.command == "lab":
        return lab_command(args)
    handler = getattr(args, "func", None) or getattr(args, "handler", None)
    if handler is None:
        raise SystemExit(f"tpmlab: no handler for {args.command!r}")
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
