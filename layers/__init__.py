"""Equinox sequence-mixer layers built on the ``ssm`` scan core (filled in by later work)."""
