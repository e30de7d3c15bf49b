"""The `filipctl` command line: one module per command group, the shared options once (options.py)."""
