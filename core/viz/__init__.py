"""Figure builders: plotly figures and pydeck scene views (no streamlit here)."""
