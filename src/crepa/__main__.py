from crepa.cli import app

if __name__ == "__main__":  # not when a spawned worker imports the main module
    app()
