"""Attention: temporal self-attention and cross-attention over map patches; for the scene-agnostic model its
candidate cells, the attention between them and each candidate's attention over the reports."""

import numpy as np
import streamlit as st

import app_widgets as wb
from core.learning import candidates as cands
from core.viz import network as netfig
from core.viz import plots as figures

wb.ensure_frame()
st.title("Attention")
ws = wb.workspace()
scene = wb.active_scene()
dataset = str(wb.active_dataset(scene))  # the sidebar's dataset (world)
st.caption("Each measurement report is a token. Reports attend to each other (temporal self-attention) and to "
           "tokens of radio-map patches (cross-attention); a scene-agnostic run has candidate cells instead of "
           "patches, each with its own report tokens, and the candidates attend to each other.")

cols = st.columns([3, 1, 1])
name = wb.pick_run(ws, scene, cols[0], key="att_run")
split = cols[1].selectbox("Split", ["test", "val", "train"], key="att_split")

run = None
with wb.guard(f"run {name}"):
    run = wb.load_run(ws.root / name, scene, dataset)
if run is None:
    st.stop()
wb.dataset_note(run)
if run.held_out:
    st.info(f"Scene {scene!r} is held out: this run never trained on it (trained on {', '.join(run.trained_scenes)}).")
elif run.scene and run.scene != scene:
    st.info(f"This run was trained on scene {run.scene!r}, not the active scene {scene!r}.")

idx = run.dataset.indices(split)
if idx.size == 0:
    st.warning(f"The {split} split of this run's dataset is empty.")
    st.stop()
pos = cols[2].number_input(f"{split.capitalize()} sample (0–{idx.size - 1})", min_value=0, max_value=int(idx.size - 1), value=0,
                           key="att_sample")
sample = int(idx[pos])


@st.cache_data(show_spinner="Running the model…", max_entries=32)
def attention_of(path: str, stamp: float, indices: tuple[int, ...], scene: str | None, ds: str | None):
    from core.learning.inference import predict

    p = predict(wb.load_run(path, scene, ds), np.array(indices), return_attention=True, return_distribution=True)
    return p


def agnostic_sample(pred, sample: int, geometry, sites, site_names: list[str]) -> None:
    """The agnostic model's map tokens for one sample: its candidate cells on the map with the attention
    between them, and each candidate's attention over the reports (tokens labelled by time and sites)."""
    view = cands.candidate_view(pred, 0)
    labels = view.labels()
    st.subheader("Candidate cells: the scene-agnostic model's map tokens")
    st.caption("This run's model is scene-agnostic (model.kind: agnostic): it has no map patches. It compares the "
               "reports with the map at its best coarse-match cells (the candidates, c1 = best match), lets each "
               "candidate's reports attend to each other, then lets the candidates attend to each other. "
               "P = the network's final probability of the cell (* = the cell it picked); background: log10 P of "
               "every coarse cell.")
    c = st.columns(3)
    n_layers, heads = len(view.attention), view.attention[0].shape[0]
    layer = c[0].selectbox("Candidate layer", list(range(1, n_layers + 1)), index=n_layers - 1, key="att_cand_layer")
    head = c[1].selectbox("Head", ["mean of heads"] + [f"head {h + 1}" for h in range(heads)], key="att_cand_head")
    query = c[2].selectbox("Query candidate", ["none: mean weight received"] + labels, key="att_cand_query")
    a = view.attention[layer - 1]
    a = a.mean(axis=0) if head.startswith("mean") else a[int(head.split()[-1]) - 1]
    q = None if query.startswith("none") else labels.index(query)
    st.plotly_chart(netfig.candidate_map(
        pred.cell_prob[0], pred.cell_bounds, view.xy, view.prob, a, q, labels, geometry, sites, pred.true_xy[0],
        pred.xy[0], title=f"Candidates of sample {sample} and their attention (layer {layer}, {head})"),
        key="att_cand_map")
    st.plotly_chart(netfig.candidate_matrix(a, labels, title=f"Attention between the candidates of sample {sample}, "
                                            f"layer {layer}, {head} (row: query, column: key)"), key="att_cand_matrix")
    st.subheader("Reports per candidate")
    pick = st.selectbox("Candidate", labels, index=max(view.chosen, 0), key="att_cand_pick",
                        help="Every candidate reads the same reports, as residuals against ITS cell's map values.")
    k = labels.index(pick)
    tokens = cands.report_labels(run.dataset, sample, site_names)
    mask = run.dataset.report_mask[sample]
    st.plotly_chart(figures.temporal_attention(
        [view.temporal[k]], mask, labels=tokens,
        title=f"Temporal self-attention of the reports at candidate {pick} (row: query report, column: key report; "
              "a report token holds the sites heard in it)"), key="att_cand_temporal")
    shares = cands.site_attention(view.temporal[k], run.dataset, sample, site_names)
    if shares:
        st.plotly_chart(netfig.site_shares(shares, title=f"Attention received per site at candidate {pick} "
                                           "(a key report's weight shared by its sites, mean of heads and queries)"),
                        key="att_sites")


def memorizing_sample(pred, sample: int, geometry, sites, mask) -> None:
    """The memorizing model's temporal attention and its cross-attention over the map patches."""
    temporal = [layer[0] for layer in pred.attention["temporal"]]  # L x [heads, T, T]
    st.plotly_chart(figures.temporal_attention(temporal, mask, title=f"Temporal self-attention of sample {sample} "
                                               "(row: query report, column: key report)"), key="att_temporal")
    st.subheader("Cross-attention over map patches")
    cross = pred.attention["cross"]  # L x [N, heads, T, P]
    n_layers, heads = len(cross), cross[0].shape[1]
    c = st.columns(3)
    layer = c[0].selectbox("Layer", list(range(1, n_layers + 1)), index=n_layers - 1, key="att_layer")
    head = c[1].selectbox("Head", ["mean of heads"] + [f"head {h + 1}" for h in range(heads)], key="att_head")
    t_len = cross[0].shape[2]
    report = c[2].selectbox("Query report", ["mean of present reports"] + [f"report {t}" for t in range(t_len)],
                            key="att_report")
    w = cross[layer - 1][0]  # [heads, T, P]
    w = w.mean(axis=0) if head.startswith("mean") else w[int(head.split()[-1]) - 1]
    w = w[mask].mean(axis=0) if report.startswith("mean") else w[int(report.split()[-1])]
    rows, cols_ = pred.patch_grid
    st.plotly_chart(figures.patch_attention_map(
        w.reshape(rows, cols_), run.radio_map.bounds, geometry, sites, pred.true_xy[0], pred.xy[0],
        title=f"Cross-attention of sample {sample}, layer {layer}, {head}, {report}"), key="att_cross")


with wb.guard("attention"):
    pred = attention_of(str(ws.root / name), wb.mtime(ws.root / name), (sample,), scene, dataset)
    geometry = wb.geometry(run.scene or scene)
    sites = run.radio_map.attrs.get("sites")
    st.markdown(f"{split.capitalize()} sample {pos} (dataset sample **{sample}**): error **{pred.error_m[0]:.1f} m**, confidence {pred.confidence[0]:.2f}, "
                f"{int(pred.num_reports[0])} valid reports, {'LOS' if pred.los[0] else 'NLOS'} at the last report.")
    mask = run.dataset.report_mask[sample]
    site_names = [str(site.get("name", k)) for k, site in enumerate(sites or [])]
    if cands.is_agnostic(pred):
        agnostic_sample(pred, sample, geometry, sites, site_names)
    else:
        memorizing_sample(pred, sample, geometry, sites, mask)

st.subheader("Average attention over the scene")
top = int(min(1024, idx.size))
n_avg = st.slider("Samples averaged", 1, top, min(top, 256), key="att_navg") if top > 1 else top
with wb.guard("average attention"):
    batch = tuple(int(i) for i in idx[: min(n_avg, idx.size)])
    avg = attention_of(str(ws.root / name), wb.mtime(ws.root / name), batch, scene, dataset)
    if cands.is_agnostic(avg):
        ranks = [f"rank {k + 1}" for k in range(avg.attention["candidate_cells"][0].shape[1])]
        st.plotly_chart(netfig.candidate_matrix(
            cands.mean_candidate_attention(avg), ranks,
            title=f"Mean attention between the candidates of the last layer over {len(batch)} {split} samples, "
                  "by coarse-match rank (all heads)"), key="att_avg_candidates")
        st.plotly_chart(netfig.network_heatmap(
            cands.mean_cell_prob(avg), avg.cell_bounds, geometry=geometry, sites=sites,
            title=f"Where the network puts its probability: mean P per coarse cell over {len(batch)} {split} samples"),
            key="att_avg")
        st.caption("Rank 1 is each sample's best coarse match; a column that draws weight from every row is a rank "
                   "the other candidates consult. Each query's weights sum to 1 over the candidates.")
    else:
        last = avg.attention["cross"][-1]  # [N, heads, T, P]
        present = run.dataset.report_mask[np.array(batch)]  # [N, T]
        weights = (last.mean(axis=1) * present[:, :, None]).sum(axis=(0, 1)) / max(present.sum(), 1)
        rows, cols_ = avg.patch_grid
        st.plotly_chart(figures.patch_attention_map(
            weights.reshape(rows, cols_), run.radio_map.bounds, geometry, sites,
            title=f"Mean cross-attention of the last layer over {len(batch)} {split} samples (all heads and reports)",
            colorbar_title="mean weight"), key="att_avg")
        st.caption("Where the model looks on average: patches holding sites and street canyons usually draw the most "
                   "attention. Each query's weights sum to 1 over all patches.")
