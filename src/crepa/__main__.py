from crepa.cli import app

app()
