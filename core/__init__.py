"""Physics-regularized UE localization: the library behind the Streamlit workbench.

`core` never imports streamlit. Every job the app launches is a ``python -m core ...``
command (see ``core/cli.py``).
"""

__version__ = "0.1.0"
