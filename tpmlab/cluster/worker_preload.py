"""Imported once by the forkserver that Dask workers are forked from (:mod:`.warm_start`):
the modules every stage needs, so that no worker imports them again.

Importing this module elsewhere does the same imports and blocks SIGINT in the calling
thread: it is meant for that server only.
"""

from __future__ import annotations

import signal

# Workers forked from this process inherit its signal mask: a Ctrl-C in the terminal, or
# Jupyter interrupting the kernel's process group, never reaches a stage.
if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

try:  # a failed import here only means the worker imports it itself
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import masking_utils, modeling_layers, modeling_utils  # noqa: F401
    from transformers.generation import utils as generation_utils  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401 - the default model

    from tpmlab.cluster import actor  # noqa: F401
    from tpmlab.models import sources  # noqa: F401
except Exception:  # pragma: no cover - reported by the worker that needs it
    pass
