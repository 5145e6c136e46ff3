"""`extrema-launch`: one module per command (its parser and its function), `app` builds the parser from them and
runs one (`main`, the console script)."""

from launch.cli.app import main

__all__ = ["main"]
