"""The command line (`luotrace`), doctor and the docs generator: the top layer.
May import every layer below and the exporters; nothing imports it."""
from tracer.cli.commands import main

__all__ = ["main"]
