"""Run files of the demo's training runs: the experiment's writer (:func:`crepa.experiment.runfiles.write_run_file`),
so each run is exactly what ``crepa precompute RUN.toml`` / ``crepa train RUN.toml`` would do."""

from crepa.experiment.runfiles import toml_value, write_run_file

__all__ = ["toml_value", "write_run_file"]
