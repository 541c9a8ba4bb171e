"""A request run in process from a thread the notebook (or a user's script) started computes
what the main thread does, its first request too (:mod:`tpmlab.runtime.compute_threads`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# OMP_NUM_THREADS=1 when torch loads (a job script's setting, or a nanny's), then the count
# raised in the main thread: a new thread starts with OpenMP's count of 1
SCRIPT = textwrap.dedent("""
    import threading, torch
    torch.set_num_threads(2)
    import tpmlab
    lab = tpmlab.connect("local", device="cpu")
    model = lab.model("tiny-llama")
    def logits():
        with model.trace("The Eiffel Tower is located in the city of"):
            out = model.output.logits.save()
        return out.value
    main = logits()
    seen = []
    thread = threading.Thread(target=lambda: seen.extend([logits(), logits()]))
    thread.start(); thread.join()
    print(max(float((v - main).abs().max()) for v in seen))
""")


def test_a_new_threads_first_request_computes_as_the_main_threads():
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k.startswith(("TPMLAB_", "HOME"))})
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 0.0
