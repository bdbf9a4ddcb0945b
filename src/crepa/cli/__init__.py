"""The ``crepa`` command: a thin layer over the library.

Each module in this package registers its commands on :data:`app` (one module per command), so a
new command is a new file and nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="crepa",
    help="Cross-frame Representation Alignment for fine-tuning video diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main() -> None:
    """Cross-frame Representation Alignment for fine-tuning video diffusion transformers."""


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
