"""Simulation backends and the virtual clock.

The backend only decides who computes client updates: this process one client after another
(:mod:`fedlab.sim.inprocess`), this process all queued clients at once (:mod:`fedlab.sim.vmap`),
or a Ray actor pool (:mod:`fedlab.sim.ray`). :class:`~fedlab.sim.transport.SimTransport` puts
the virtual clock (:mod:`fedlab.sim.clock`) in front of any of them, so timing and sampling are
the same for every backend and worker count, and so are results (to floating-point rounding for
``vmap``). A run is assembled from its configuration in :mod:`fedlab.run`.
"""

from __future__ import annotations

from fedlab.sim.clock import SpeedModel
from fedlab.sim.transport import SimTransport

__all__ = ["SimTransport", "SpeedModel"]
