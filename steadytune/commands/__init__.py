"""CLI subcommands, one module each (see steadytune/cli.py)."""
