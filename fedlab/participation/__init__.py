"""Participation models: which clients nature makes available at each version.

Availability is a property of the simulated world, not of the strategy: a strategy sees only
who is available (``Round.available``) and who answered, never the true probabilities,
unless it is explicitly built with them (the ``known-probability`` baseline).

``uniform`` makes everybody available and lets the server sample ``fraction`` of them
(classic FedAvg). The other models decide the participants themselves and the server takes
every available client:

* ``bernoulli``: client ``n`` is available with probability ``p_n``, independently per version.
* ``cyclic``: client ``n`` is available for a block of ``round(cycle * p_n)`` consecutive
  versions out of every cycle (FedAU's cyclic participation).
* ``markov``: a two-state on/off chain per client.
* ``trace``: availability read from a CSV file.

The per-client probabilities ``p_n`` of ``bernoulli``, ``cyclic`` and ``markov`` come from one
of: ``p`` (the same for everybody; defaults to the run's ``fraction``), ``recipe="tiled"`` with
``values`` (a list repeated over client ids), or ``recipe="fedau"`` (the FedAU paper's
label-correlated probabilities, see :func:`fedau_probabilities`).

Every random draw derives from ``(seed, purpose, version)`` with nothing carried between
versions (the Markov chain recomputes its past from those same streams), so a resumed run
and any worker count see the same participants.

The models and their protocol are in :mod:`~fedlab.participation.models`, FedAU's recipe in
:mod:`~fedlab.participation.fedau`, trace files in :mod:`~fedlab.participation.trace`, and
:func:`build_participation` (a model from its name and the user's options) in
:mod:`~fedlab.participation.factories`.
"""

from __future__ import annotations

from fedlab.participation.factories import MODELS, build_participation
from fedlab.participation.fedau import fedau_probabilities
from fedlab.participation.models import (
    Bernoulli,
    Cyclic,
    Markov,
    Participation,
    Trace,
    Uniform,
)
from fedlab.participation.trace import read_trace

__all__ = [
    "MODELS",
    "Bernoulli",
    "Cyclic",
    "Markov",
    "Participation",
    "Trace",
    "Uniform",
    "build_participation",
    "fedau_probabilities",
    "read_trace",
]
