"""``python -m legion_rt``: the ``legion-rt`` command line."""

from .cli import entry

entry()
