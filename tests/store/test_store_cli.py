import json

from safetensors.torch import save_file
from store_helpers import same_bytes, tiny_state_dict

from tpmlab.store import Store
from tpmlab.store.cli import main


def _run(capsys, *argv):
    code = main(["store", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trip(tmp_path, capsys):
    root = str(tmp_path / "store")
    folder = tmp_path / "model"
    folder.mkdir()
    sd = tiny_state_dict()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))

    code, out, _ = _run(capsys, "commit", str(folder), "-m", "base", "--store", root, "--tag", "base")
    assert code == 0
    v1 = out.strip()
    store = Store(root)
    assert store.resolve("base") == v1
    assert store.config(v1) == {"model_type": "llama", "hidden_size": 16}
    loaded = store.load("base")
    assert all(same_bytes(loaded[k], sd[k]) for k in sd)

    edited = dict(sd, **{"norm.weight": sd["norm.weight"] * 2})
    single = tmp_path / "edited.safetensors"
    save_file(edited, str(single))
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    code, out, _ = _run(capsys, "commit", str(single), "-m", "double norm", "--parent", "base",
                        "--config", str(config_file), "--store", root)
    v2 = out.strip()
    assert code == 0 and store.info(v2).parent == v1

    code, out, _ = _run(capsys, "log", v2[:8], "--store", root)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(v2[:12]) and lines[0].endswith("double norm")
    assert "(base)" in lines[1]

    code, out, _ = _run(capsys, "diff", "base", v2[:10], "--store", root)
    assert code == 0 and out.startswith("norm.weight: max|Δ|=1 ") and "changed=100.00%" in out

    assert _run(capsys, "tag", "latest", v2, "--store", root)[0] == 0
    code, out, _ = _run(capsys, "tag", "--store", root)
    assert out.splitlines() == [f"base  {v1[:12]}", f"latest  {v2[:12]}"]
    code, _, err = _run(capsys, "tag", "base", v2, "--store", root)
    assert code == 2 and "force" in err
    assert _run(capsys, "tag", "base", v2, "--force", "--store", root)[0] == 0

    code, out, _ = _run(capsys, "verify", "--store", root)
    assert code == 0 and out.strip().endswith("ok")
    code, out, _ = _run(capsys, "gc", "--store", root)
    assert code == 0 and out.startswith("deleted 0 chunks")

    # corrupt a chunk: verify fails with exit code 1 and names the tensor
    chunk = store.manifest(v2)["tensors"]["embed.weight"]["chunks"][0]
    (tmp_path / "store" / "chunks" / chunk[:2] / chunk).write_bytes(b"x")
    code, out, _ = _run(capsys, "verify", v2, "--store", root)
    assert code == 1 and "embed.weight" in out


def test_cli_errors_are_messages(tmp_path, capsys):
    root = str(tmp_path / "s")
    code, _, err = _run(capsys, "log", "nope", "--store", root)
    assert code == 2 and "no version or tag named 'nope'" in err
    code, _, err = _run(capsys, "commit", str(tmp_path / "missing"), "-m", "x", "--store", root)
    assert code == 2 and "neither" in err


def test_register_into_a_parent_parser(tmp_path):
    import argparse

    from tpmlab.store.cli import register

    parser = argparse.ArgumentParser(prog="tpmlab")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["store", "gc", "--store", str(tmp_path)])
    assert args.func(args) == 0
