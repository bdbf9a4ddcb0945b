"""crepa's own diffusers components, imported by the commands that load a pipeline."""

from __future__ import annotations


def import_component_modules() -> None:
    """Import the modules of crepa's own diffusers model classes (the demo's VAE,
    :mod:`crepa.demo.latent`), so that a pipeline saved with them loads in any command: diffusers
    resolves a component of another library from ``sys.modules`` only, it never imports one itself.

    Called inside the commands, not when the CLI is imported: ``crepa --help`` does not wait for
    torch and diffusers."""
    import crepa.demo.latent  # noqa: F401
