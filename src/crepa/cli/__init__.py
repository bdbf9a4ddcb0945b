"""The ``crepa`` command: a thin layer over the library.

Each module in this package registers its commands on :data:`app` (one module per command), so a
new command is a new file and nothing else changes.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import warnings

import typer

app = typer.Typer(
    name="crepa",
    help="Cross-frame Representation Alignment for fine-tuning video diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# bitsandbytes, which diffusers and peft import whenever it is installed, says at import, on a CPU with
# AVX512-BF16 and without the `kernels` package, that its CPU 4-bit kernel is missing, and its
# torch.compile at import reaches a deprecated torch.jit call: neither concerns crepa (it runs only the
# 8-bit AdamW, on CUDA), and without these filters they were the first lines of every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings(
    "ignore", message="`torch.jit.script_method` is deprecated", category=DeprecationWarning
)


def _print_version(value: bool) -> None:
    """``--version``: the installed distribution's version (package metadata: no heavy import)."""
    if value:
        from importlib.metadata import version

        typer.echo(f"crepa {version('crepa')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Show the installed crepa version and exit.",
    ),
) -> None:
    """Cross-frame Representation Alignment for fine-tuning video diffusion transformers."""


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
