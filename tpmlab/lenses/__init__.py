"""The lens zoo: find lenses by name.

A lens is a plugin written only against tpmlab's public API. Lenses come from
three places, looked up in this order (the first one holding a name wins):

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
package); files whose name starts with ``_`` are not lenses.

>>> import tpmlab.lenses
>>> tpmlab.lenses.available()                      # doctest: +SKIP
['attention', 'logit', 'memory_injection', 'patching', 'tuned']
>>> logit = tpmlab.lenses.get("logit")              # doctest: +SKIP
>>> result = logit.run(model, "The Eiffel Tower is in")   # doctest: +SKIP
"""

from __future__ import annotations

from .registry import (
    ENTRY_POINT_GROUP,
    LensNotFoundError,
    available,
    get,
    lens_dirs,
    register,
    sources,
)
from .result import LensResult, Provenance

__all__ = [
    "ENTRY_POINT_GROUP",
    "LensNotFoundError",
    "LensResult",
    "Provenance",
    "available",
    "get",
    "lens_dirs",
    "register",
    "sources",
]
