"""Beam search inside the engine: a prompt's live beams are requests that run in the same steps (see
``manager.py`` for a group's life, ``group.py`` for the search, ``scheduling.py`` for running a group as a unit)."""
