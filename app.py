"""The workbench: ``streamlit run app.py`` (or ``make run``).

This file is the frame every page runs in: page setup, the navigation, and the
active-scene picker in the sidebar. The pages live in ``pages/`` and stay thin: they
call ``core`` and draw.
"""

import streamlit as st

import app_widgets as wb

st.set_page_config(page_title="Localization workbench", layout="wide")

PAGES = [
    st.Page("pages/scenes.py", title="Scenes", default=True),
    st.Page("pages/radio_maps.py", title="Radio maps"),
    st.Page("pages/training.py", title="Training"),
    st.Page("pages/attention.py", title="Attention"),
    st.Page("pages/refinement.py", title="Refinement inspector"),
    st.Page("pages/localize.py", title="Localize"),
]

page = st.navigation(PAGES)
st.session_state["_session_started"] = True  # see workbench.ensure_frame
with st.sidebar:
    with wb.guard("scene list"):
        wb.scene_picker(st.sidebar)
        wb.dataset_picker(st.sidebar)
    st.caption("Physics-regularized UE localization with Sionna RT radio maps and a map-conditioned transformer.")
wb.show_flash()
with wb.guard():  # never a traceback on the page
    page.run()
