"""Makes the packages named in $MCAT_BLOCKED_IMPORTS (comma-separated) absent, as on a machine without
them: tests put this folder on PYTHONPATH to run a command the way the stock GPU image would. The
path finder stops finding them, so ``importlib.util.find_spec`` says None and ``import`` raises
ModuleNotFoundError, exactly as when they are not installed."""

import importlib.machinery
import os

BLOCKED = {name for name in os.environ.get("MCAT_BLOCKED_IMPORTS", "").split(",") if name}

if BLOCKED:
    _find_spec = importlib.machinery.PathFinder.find_spec.__func__

    def _find_unblocked_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return _find_spec(cls, name, path, target)

    importlib.machinery.PathFinder.find_spec = classmethod(_find_unblocked_spec)
