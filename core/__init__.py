"""Physics-regularized UE localization: the library behind the Streamlit app.

`core` never imports streamlit. Every job the app launches is a ``python -m core ...``
command (see ``core/cli.py``). Sub-packages by layer: ``stores`` (on-disk contracts),
``physics`` (lookup, likelihood, refinement), ``raytracing`` (Sionna RT), ``learning``
(model, training, evaluation), ``jobs`` (background processes), ``viz`` (figures).
"""

from pathlib import Path

__version__ = "0.2.0"

#: The repository root: default workspace, presets and the jobs database live under it.
REPO_ROOT = Path(__file__).resolve().parents[1]
