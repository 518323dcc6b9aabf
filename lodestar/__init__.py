"""Lodestar shared core: settings, message contracts, names, hashing, features and the CLI."""

__version__ = "0.1.0"
