"""User distortions on the command line: ``--import MODULE`` (a module that calls
:func:`~timm_icl.distortions.register_distortion` when imported) and the entry-point group
``timm_icl.distortions``, which installed packages use to register theirs without any flag::

    # pyproject.toml of a package with its own distortions
    [project.entry-points."timm_icl.distortions"]
    my_kinds = "my_package.distortions"          # a module (imported), or "module:function" (called)

``timm-icl eval``, ``timm-icl distort`` and ``recipes/train_icl.py`` call :func:`load_distortion_plugins` before
they parse a distortion set, so ``--distortions invert:0.5`` works wherever the kind was registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

__all__ = ["ENTRY_POINT_GROUP", "load_distortion_plugins"]

ENTRY_POINT_GROUP = "timm_icl.distortions"
_loaded: set[str] = set()


def _import(module: str) -> None:
    """Import ``module`` (a dotted name, or a ``.py`` file path); one ValueError line when it fails."""
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise ValueError(f"--import {module}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[path.stem] = mod
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # a module beside the user, as `python -m` would find it
            importlib.import_module(module)
    except ValueError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--import {module}: {type(e).__name__}: {first}") from None


def load_distortion_plugins(modules: Iterable[str] | None = None) -> list[str]:
    """Import each of ``modules`` (``--import``) and every entry point of :data:`ENTRY_POINT_GROUP` (once per
    process); returns what was loaded. A failing one is a one-line ValueError naming it."""
    from importlib.metadata import entry_points

    loaded = []
    for module in modules or ():
        if module not in _loaded:
            _import(module)
            _loaded.add(module)
            loaded.append(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {ep.name} = {ep.value}"
        if key in _loaded:
            continue
        try:
            target = ep.load()
            if callable(target) and ":" in ep.value:
                target()
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{ENTRY_POINT_GROUP} {key}: {type(e).__name__}: {first}") from None
        _loaded.add(key)
        loaded.append(key)
    return loaded
