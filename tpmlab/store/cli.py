"""``tpmlab store ...``: commit, log, diff, tag, verify, gc and seal from the shell.

``register(subparsers)`` adds the ``store`` command to the ``tpmlab`` parser; every
subcommand sets ``args.func``, which takes the parsed ``args`` and returns an exit
code (0 ok, 1 verification failed, 2 bad input). ``main(argv)`` runs it standalone:
``python -m tpmlab.store.cli commit path/to/hf_folder -m "base"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .default import default_store
from .errors import StoreError, StoreInputError
from .store import Store


def read_weights(path: Path, config_file: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and config dict of a Hugging Face folder or a ``.safetensors`` file.

    A folder needs ``config.json`` and ``*.safetensors`` (sharded with
    ``model.safetensors.index.json`` or not). For a single file the config is
    ``config_file``, else ``config.json`` beside it, else ``{}``.
    """
    from safetensors.torch import load_file

    path = path.expanduser()
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in folder {path}")
        config_file = config_file or path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in folder {path} (pass --config)")
    elif path.is_file():
        files = [path]
        config_file = config_file or path.with_name("config.json")
    else:
        raise FileNotFoundError(f"{path} is neither a Hugging Face folder nor a safetensors file")
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        state_dict.update(load_file(str(f)))
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return state_dict, config


def _store(args: argparse.Namespace) -> Store:
    return Store(args.store) if args.store else default_store()


def _cmd_commit(args: argparse.Namespace) -> int:
    store = _store(args)
    state_dict, config = read_weights(Path(args.path), Path(args.config) if args.config else None)
    digest = store.commit(state_dict, config=config, message=args.message, parent=args.parent)
    s = store.stats
    print(digest)
    print(f"{len(state_dict)} tensors; wrote {s.chunks_written} new chunks "
          f"({s.bytes_written / 2**20:.1f} MiB), {s.chunks_deduplicated} already stored",
          file=sys.stderr)
    if args.tag:
        store.tag(args.tag, digest, force=args.force)
    return 0


def _cmd_log(args: argparse.Namespace) -> int:
    store = _store(args)
    by_digest: dict[str, list[str]] = {}
    for name, d in store.tags().items():
        by_digest.setdefault(d, []).append(name)
    for info in store.log(args.ref)[: args.max_count]:
        tags = f" ({', '.join(by_digest[info.digest])})" if info.digest in by_digest else ""
        print(f"{info.short}{tags}  {info.timestamp}  {info.n_tensors} tensors  {info.message}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    diffs = _store(args).diff(args.a, args.b)
    for d in diffs:
        print(d)
    if not diffs:
        print("no tensor differs")
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.delete:
        store.untag(args.delete)
    elif args.name is None:
        for name, d in store.tags().items():
            print(f"{name}  {d[:12]}")
    elif args.ref is None:
        raise StoreInputError("tag needs a version to point at: tpmlab store tag NAME REF")
    else:
        print(store.tag(args.name, args.ref, force=args.force))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    report = _store(args).verify(args.ref)
    print(report)
    return 0 if report.ok else 1


def _cmd_gc(args: argparse.Namespace) -> int:
    print(_store(args).gc(timeout=args.timeout))
    return 0


def _cmd_seal(args: argparse.Namespace) -> int:
    sealed = _store(args).seal_history()
    for digest in sealed:
        print(digest)
    print(f"wrote the history record of {len(sealed)} version(s)", file=sys.stderr)
    return 0


def _run(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (StoreError, FileNotFoundError, KeyError, ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``store`` and its subcommands to a ``tpmlab`` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="store folder or fsspec URL (default: $TPMLAB_HOME/store)")
    p = subparsers.add_parser("store", help="versioned weight store", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="store_command", metavar="COMMAND", required=True)

    c = sub.add_parser("commit", parents=[common], help="commit a Hugging Face folder or safetensors file")
    c.add_argument("path", help="Hugging Face model folder or .safetensors file")
    c.add_argument("-m", "--message", required=True)
    c.add_argument("--parent", help="parent version (digest, prefix or tag)")
    c.add_argument("--config", help="config JSON file (default: the folder's config.json)")
    c.add_argument("--tag", help="also tag the new version with this name")
    c.add_argument("--force", action="store_true", help="move --tag if it exists")
    c.set_defaults(func=_run(_cmd_commit))

    c = sub.add_parser("log", parents=[common], help="history of a version")
    c.add_argument("ref")
    c.add_argument("-n", "--max-count", type=int, default=None)
    c.set_defaults(func=_run(_cmd_log))

    c = sub.add_parser("diff", parents=[common], help="tensors that differ between two versions")
    c.add_argument("a")
    c.add_argument("b")
    c.set_defaults(func=_run(_cmd_diff))

    c = sub.add_parser("tag", parents=[common], help="list tags, or point NAME at REF")
    c.add_argument("name", nargs="?")
    c.add_argument("ref", nargs="?")
    c.add_argument("-f", "--force", action="store_true", help="move an existing tag")
    c.add_argument("-d", "--delete", metavar="NAME", help="delete tag NAME")
    c.set_defaults(func=_run(_cmd_tag))

    c = sub.add_parser("verify", parents=[common], help="check every chunk (of REF or all versions)")
    c.add_argument("ref", nargs="?")
    c.set_defaults(func=_run(_cmd_verify))

    c = sub.add_parser("gc", parents=[common], help="delete chunks no version references")
    c.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for commits in flight (default: as long as they take)")
    c.set_defaults(func=_run(_cmd_gc))

    c = sub.add_parser("seal", parents=[common],
                       help="write the history records of versions an older tpmlab committed")
    c.set_defaults(func=_run(_cmd_seal))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``store`` subcommands as ``tpmlab store`` would; returns the exit code."""
    parser = argparse.ArgumentParser(prog="tpmlab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv) if argv is not None else None)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
