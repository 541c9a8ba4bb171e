"""Torch dtypes numpy has no type of its own for, and the integer dtype of the same size
each travels and is viewed as. Shared by the wire format between stages
(:mod:`tpmlab.cluster.wire`) and remote values (:mod:`tpmlab.remote`); kept here so that
``import tpmlab`` does not load the cluster package."""

from __future__ import annotations

import torch

#: a dtype numpy lacks -> the integer dtype of the same size its bytes travel as
INTEGER_VIEWS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
                 torch.float8_e5m2: torch.uint8}
NUMPY_LACKS = frozenset(INTEGER_VIEWS)  #: torch dtypes with no numpy type of their own
