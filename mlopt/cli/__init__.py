"""The command line: a thin Typer layer that builds recipes and hands them to the runner."""
