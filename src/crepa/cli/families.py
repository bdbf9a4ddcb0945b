"""``crepa families``: the support matrix (family, variant, task, trainable, CREPA block, tiny test, reason)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from crepa.cli import app


@app.command()
def families(
    markdown: bool = typer.Option(False, "--markdown", help="Print the markdown table the README shows."),
) -> None:
    """Which model families and checkpoints crepa trains (text- and image-to-video), and why not where it does not."""
    from crepa.models.support import SUPPORT_COLUMNS, support_markdown, support_rows

    if markdown:
        typer.echo(support_markdown())
        return
    table = Table(*SUPPORT_COLUMNS, show_lines=False)
    for row in support_rows():
        style = {"yes": "green", "untested": "yellow", "no": "red"}[row.trainable]
        table.add_row(
            row.family,
            row.variant,
            row.task,
            f"[{style}]{row.trainable}[/{style}]",
            str(row.crepa_block),
            row.tiny_test,
            row.reason,
        )
    console = Console()
    if not console.is_terminal:  # piped: full rows rather than an 80-column wrap
        console = Console(width=240)
    console.print(table)
