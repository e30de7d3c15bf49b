"""`python -m filipctl.cli`: the same entry point as the `filipctl` script."""

from filipctl.cli.app import main

main()
