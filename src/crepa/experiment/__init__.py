"""``crepa experiment``: variants x seeds of one run file, trained, sampled and evaluated alike, and a
verdict from paired per-seed statistics (:mod:`crepa.experiment.verdict`)."""
