"""The ClientApp: fedlab's client half and update pipeline, configured by the run config."""

from __future__ import annotations

from fedlab.flower import config_client_app

# Each node trains on its own partition (its `partition-id`) with the client half, DP-SGD and
# FedZip that the `fedlab.` keys of the run config ask for, and keeps its client state in the
# node's context between rounds.
app = config_client_app()
