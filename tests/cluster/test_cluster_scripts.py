"""tpmlab.connect() in a plain script: without an ``if __name__ == "__main__":`` guard the
spawned worker processes would re-run the script; the script stops with one line saying
what to do instead of distributed's "Nanny failed to start" traceback."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

from tpmlab.cluster.embedded import under_main_guard


def _run(tmp_path, source: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "analysis.py"
    script.write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPMLAB_SCHEDULER")}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unguarded_script_is_told_what_to_do_in_one_line(tmp_path):
    proc = _run(tmp_path, """\
        import tpmlab

        lab = tpmlab.connect(n_workers=1)
        print("started a cluster")
    """)
    assert proc.returncode == 1
    assert "started a cluster" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "analysis.py line 3" in lines[0]
    assert 'if __name__ == "__main__":' in lines[0]
    assert "Traceback" not in proc.stderr and "Nanny" not in proc.stderr


def test_an_unguarded_call_inside_a_function_is_caught_too(tmp_path):
    proc = _run(tmp_path, """\
        import tpmlab

        def main():
            return tpmlab.connect(n_workers=1)

        lab = main()
    """)
    assert proc.returncode == 1
    assert "line 6" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_guarded_script_starts_its_cluster(tmp_path):
    proc = _run(tmp_path, """\
        import tpmlab

        def main():
            with tpmlab.connect(n_workers=1) as lab:
                print(lab.backend.client.scheduler.address.split(":")[0])

        if __name__ == "__main__":
            main()
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["tls"]


@pytest.mark.parametrize("source,lineno,guarded", [
    ('x = 1\nif __name__ == "__main__":\n    y = 2\n', 3, True),
    ('x = 1\nif __name__ == "__main__":\n    y = 2\n', 1, False),
    ("if '__main__' == __name__:\n    y = (\n        2)\n", 3, True),
    ('if __name__ == "__main__":\n    pass\nelse:\n    y = 2\n', 4, False),
    ('if __name__ != "__main__":\n    y = 2\n', 2, False),
    ('def f():\n    if __name__ == "__main__":\n        y = 2\n', 3, True),
])
def test_main_guard_detection(source, lineno, guarded):
    assert under_main_guard(ast.parse(source), lineno) is guarded
