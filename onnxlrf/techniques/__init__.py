"""Compression techniques, one package each, behind the protocol in :mod:`onnxlrf.techniques.base`.

:data:`TECHNIQUES` is the registry: adding a technique means adding its package, its entry class
to :data:`onnxlrf.planning.plan.ENTRY_TYPES`, and its object here.
"""

from .lowrank.technique import LOWRANK
from .quant.technique import QUANT

TECHNIQUES = {LOWRANK.name: LOWRANK, QUANT.name: QUANT}
