"""Will the run fit, and what is the fastest setting that does: the memory and FLOP model of a
training step, predicted from the published config on the meta device (``crepa plan``)."""
