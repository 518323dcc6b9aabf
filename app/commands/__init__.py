"""Subcommands of the `lodestar` CLI, one module each."""
