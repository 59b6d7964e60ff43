"""Map: the t-SNE of real samples by class, with the perturbed selection placed on it (paper Fig. 2, left)."""

from __future__ import annotations

import dataclasses
import shlex
import time

import streamlit as st

from tspg import charts
from tspg.app import loaders as L
from tspg.app import render as R
from tspg.app import state as S
from tspg.app.selection import map_class_options, map_classes_default, picked_map_classes
from tspg.app.views import command, data_arg, models_arg
from tspg.embedding import MAP_MAX_CLASSES, MAP_MAX_PER_CLASS, perturbation_map_frame

bundle, data = R.page_start("Map")
labels = data.labels(bundle.label_key)
if labels is None:
    st.error(
        f"{data.label} has no {bundle.label_key!r} column in obs: the map needs each real sample's class."
    )
    S.stop()

sel, pert = R.page_perturbation(bundle, data)

ss = st.session_state
with R.guard("The map cannot be drawn for these data"):
    options = map_class_options(labels, bundle.target)
    S.note_dropped(
        S.MAP_CLASSES,
        [c for c in ss.get(S.MAP_CLASSES) or [] if c not in set(options)],
        "map class(es) not in the data",
    )
    # the classes shown (compared with the default of the last run, then remembered)
    shown = picked_map_classes(
        labels, bundle.target, pert.labels, ss.get(S.MAP_CLASSES), ss.get(S.MAP_AUTO)
    )[1:]
    ss[S.MAP_AUTO] = map_classes_default(labels, bundle.target, pert.labels)
    ss[S.MAP_CLASSES] = shown
c1, c2, c3 = st.columns([5, 1, 2], vertical_alignment="bottom")
c1.multiselect(
    f"Classes of the real samples besides the target, {bundle.target} (at most {MAP_MAX_CLASSES - 1})",
    options,
    key=S.MAP_CLASSES,
    max_selections=MAP_MAX_CLASSES - 1,
    wrap=True,
    help="By default the source classes of the selection, then the most frequent others.",
)
c2.number_input("Seed", min_value=0, step=1, key=S.MAP_SEED, help="Seed of the t-SNE fit.")
c3.toggle(
    "Show the moves",
    key=S.MAP_MOVES,
    help="Each selected sample's place before perturbation (hollow square), joined by a line "
    "to its place after (cross).",
)
classes = picked_map_classes(
    labels, bundle.target, pert.labels, ss.get(S.MAP_CLASSES), ss.get(S.MAP_AUTO)
)
seed = int(ss[S.MAP_SEED])

with R.guard("Fitting the t-SNE map failed"):
    ref, ref_idx = L.reference_map(bundle, data, classes, seed)
mkey = L.map_key(bundle, data, classes, seed)
joint_id = (mkey, L.bundle_key(bundle), tuple(pert.samples))

row = st.container(horizontal=True)
row.button(
    "Recompute as a joint map",
    icon=":material/refresh:",
    key="map_joint_button",
    on_click=S.set_state,
    args=(S.MAP_JOINT, joint_id),
    help="One t-SNE of the real and the perturbed samples together (slower; the reference map moves).",
)
is_joint = st.session_state.get(S.MAP_JOINT) == joint_id
if is_joint:
    row.button(
        "Back to the reference map",
        icon=":material/undo:",
        key="map_back_button",
        on_click=S.set_state,
        args=(S.MAP_JOINT, None),
    )

moves = bool(ss.get(S.MAP_MOVES, True))
start = time.perf_counter()
with R.guard("Placing the perturbed samples failed"):
    if is_joint:
        real_xy, new_xy = L.joint(ref_idx, mkey, bundle, data, pert, seed)
        shown_ref, before_xy = dataclasses.replace(ref, coords=real_xy, embedding=None), None
    else:
        (before_xy, new_xy), shown_ref = L.placed(ref, mkey, bundle, pert), ref
seconds = time.perf_counter() - start

with R.guard("Drawing the map failed"):
    real_pred = L.real_predictions(bundle, data)[ref_idx]
    frame = perturbation_map_frame(
        shown_ref, pert, coords=new_xy, real_pred=real_pred, before=before_xy
    )
    how = (
        "from a joint t-SNE fit (their places before perturbation are not part of that fit)."
        if is_joint
        else f"placed on the fixed reference map in {seconds:.2f} s"
        + (
            "; hollow squares: the same samples before perturbation, placed the same way, "
            "each joined to its cross."
            if moves
            else "."
        )
    )
    st.caption(
        f"Dots: {len(ref)} real samples of {len(set(ref.labels))} classes. Crosses: the selection's perturbed samples "
        f"({sel.description}), coloured by their source class, {how} "
        "Click a class in the legend to highlight it, or 'selected, after (perturbed)' to isolate the perturbed samples; "
        "hover a point for its sample, class and prediction."
        + (
            f" Each cross is x + the mean P of the bundle's {bundle.n_generators} generators: an "
            "average, a little more compact than any one generator's perturbed samples."
            if bundle.n_generators > 1
            else ""
        )
    )
    R.show_chart(
        charts.map_chart(frame, moves=moves, width="container", height=560),
        f"map-{bundle.name}",
        key="map_chart",
        stretch=True,
    )

R.show_table(
    frame,
    f"map-{bundle.name}",
    key="map_frame",
    index=False,
    width="stretch",
    height=240,
)
R.reproduce(
    {
        "bundle": bundle.name,
        "data": data.label,
        "classes": classes,
        "n_per_class": MAP_MAX_PER_CLASS,
        "seed": seed,
        "joint": is_joint,
        "selection": sel.params,
        **ref.params,
    },
    ("# the reference map (the joint fit has no command)\n" if is_joint else "")
    + command(
        "tspg map",
        shlex.quote(bundle.name),
        data_arg(bundle, data, optional=True),
        "-o map.csv",
        "--classes",
        *map(shlex.quote, classes),
        f"--n-per-class {MAP_MAX_PER_CLASS} --seed {seed}",
        "--samples",
        *map(shlex.quote, pert.samples),
        models_arg(L.models_root()),
    ),
)
