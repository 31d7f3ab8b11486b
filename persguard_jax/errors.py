"""The errors a user can act on, so the CLI can say them in one line (exit status 2) instead of a traceback.

Three families, each raised where the fault is found, with a message naming the file, key or value:
- ``ValueError`` and its kin for bad input: ``config.ConfigError`` (a config key or value),
  ``models.convert.WeightsError`` (a weights folder or file), unreadable photos, unknown subjects;
- ``OSError`` for files and folders (missing, not a folder, not writable);
- ``RunError`` for a run that cannot go on (below).
"""
from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot go on, and what to do about it: a diverged loss (``train.loop.TrainingDiverged``), a
    ``--resume`` whose checkpoints cannot be read, a folder that is not a run."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RunError)
