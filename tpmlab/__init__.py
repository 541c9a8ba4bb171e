"""tpmlab: trace, patch and visualize large language models sharded over Dask, from Jupyter."""

from ._version import __version__
from .errors import ExecutionError, PlanError, TpmlabError
from .lab import Lab, connect

__all__ = ["Lab", "connect", "PlanError", "ExecutionError", "TpmlabError", "__version__"]
