"""madness_ppl: deblend multi-band survey images with a learned galaxy prior in NumPyro.

The public API, imported lazily (``import madness_ppl`` stays fast; JAX loads on first use):

>>> import madness_ppl
>>> madness_ppl.__version__
'0.1.0'

``madness_ppl.deblend(field)`` runs the pipeline; ``madness_ppl.deblend`` is also the submodule
(callable), so ``from madness_ppl.deblend import DeblendResult`` works alongside it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Survey": "madness_ppl.survey",
    "GalaxyModel": "madness_ppl.galaxy_model",
    "GalaxyPrior": "madness_ppl.prior",
    "FlowPrior": "madness_ppl.prior",
    "blend_model": "madness_ppl.scene",
    "fit_map": "madness_ppl.infer",
    "MAPResult": "madness_ppl.infer",
    "sample_posterior": "madness_ppl.infer",
    "deblend": "madness_ppl.deblend",
    "DeblendOptions": "madness_ppl.options",
    "Detection": "madness_ppl.options",
    "make_blend": "madness_ppl.simulate",
    "BlendConfig": "madness_ppl.simulate",
    "read_field": "madness_ppl.io",
    "MadnessInputError": "madness_ppl.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "deblend":
        # the submodule itself, made callable (it forwards to madness_ppl.deblend.deblend): the
        # import system rebinds ``madness_ppl.deblend`` to the submodule on import, so exporting
        # the function under the same name would break on the second access
        return importlib.import_module("madness_ppl.deblend")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'madness_ppl' has no attribute {name!r}")
