"""The lens zoo: lenses found by name, each keeping one contract.

A lens is a plugin written only against tpmlab's public API: one module exporting
``NAME``, ``TITLE``, ``DESCRIPTION``, ``VIEW`` (a :class:`LensView`: inputs, options,
axes, metrics, detail panel) and ``run(model, *inputs, progress=None, **options)``, which
returns a :class:`LensResult` (see :mod:`tpmlab.lenses.contract`). The dashboard
(``tpmlab.widgets.dashboard(model, NAME)``), the sidebar's lens menu and the API reference
read every lens through that contract alone, so adding a lens is adding one module.

Lenses come from three places, looked up in this order (the first one holding a name wins):

1. the ``tpmlab/_lenses`` folder of an installed wheel (the repository's
   ``lenses/`` folder, copied in at build time);
2. the ``lenses/`` folder next to the ``tpmlab`` package in a repository
   checkout (an editable install);
3. the entry-point group ``"tpmlab.lenses"`` of any installed distribution::

       [project.entry-points."tpmlab.lenses"]
       my_lens = "my_package.my_lens"          # a module or any object

Folders in ``TPMLAB_LENS_PATH`` (``os.pathsep``-separated) are searched after the
built-in ones. A plugin file ``NAME.py`` is loaded by path under the private
module name ``tpmlab.lenses._plugins.NAME`` (never as a top-level ``lenses``
package); files whose name starts with ``_`` are not lenses. A plugin that does not keep
the contract is refused with :class:`LensContractError`, which names what it lacks.

>>> import tpmlab.lenses
>>> tpmlab.lenses.available()                      # doctest: +SKIP
['attention', 'logit', 'memory_injection', 'patching', 'residual', 'tuned']
>>> logit = tpmlab.lenses.get("logit")              # doctest: +SKIP
>>> result = logit.run(model, "The Eiffel Tower is in")   # doctest: +SKIP
>>> tpmlab.lenses.info("logit").view.metrics[0].label     # doctest: +SKIP
'probability'
"""

from __future__ import annotations

from .contract import (
    INPUTS,
    Axis,
    Bars,
    Cancelled,
    Cell,
    LensContractError,
    LensInfo,
    LensInputError,
    LensView,
    Metric,
    Option,
    Progress,
    Table,
    check,
)
from .discovery import (
    ENTRY_POINT_GROUP,
    LensNotFoundError,
    available,
    catalog,
    get,
    info,
    lens_dirs,
    register,
    sources,
)
from .result import LensResult, Provenance

__all__ = [
    "ENTRY_POINT_GROUP",
    "INPUTS",
    "Axis",
    "Bars",
    "Cancelled",
    "Cell",
    "LensContractError",
    "LensInputError",
    "LensInfo",
    "LensNotFoundError",
    "LensResult",
    "LensView",
    "Metric",
    "Option",
    "Progress",
    "Provenance",
    "Table",
    "available",
    "catalog",
    "check",
    "get",
    "info",
    "lens_dirs",
    "register",
    "sources",
]
