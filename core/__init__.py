"""Physics-regularized UE localization: the library behind the Streamlit app.

`core` never imports streamlit. Every job the app launches is a ``python -m core ...``
command (see ``core/cli.py``). Sub-packages by layer: ``stores`` (on-disk contracts),
``physics`` (lookup, likelihood, refinement), ``raytracing`` (Sionna RT), ``learning``
(model, training, evaluation), ``jobs`` (background processes), ``viz`` (figures).
"""

import os
from pathlib import Path

__version__ = "0.2.0"

#: The repository root: default workspace, presets and the jobs database live under it.
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute or present from the working directory, else under
    :data:`REPO_ROOT` when it exists there: ``datasets/etoile`` works from any directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p
