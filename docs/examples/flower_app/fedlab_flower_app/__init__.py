"""A Flower app that runs a fedlab strategy and fedlab's clients."""
