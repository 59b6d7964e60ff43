"""Session-state keys of the dashboard and their defaults (no streamlit here: the URL codec
:mod:`tspg.app.query` reads them too)."""

from __future__ import annotations

__all__ = [
    "ALL_SOURCES",
    "BUNDLE",
    "DATA",
    "DATA_CHOICES",
    "DEFAULTS",
    "DEMO_EPOCHS",
    "ENRICHMENT_THRESHOLDS",
    "ENR_BACKEND",
    "ENR_DIRECTION",
    "ENR_GMTS",
    "ENR_GMTS_OFFERED",
    "ENR_LIBRARIES",
    "ENR_THRESHOLD",
    "ENR_WHAT",
    "GENE",
    "GENES_SOURCE",
    "HEAT_SAMPLE",
    "HEAT_VIEW",
    "MAP_AUTO",
    "MAP_CLASSES",
    "MAP_JOINT",
    "MAP_MOVES",
    "MAP_SEED",
    "MAX_UPLOAD_MB",
    "NOTES",
    "NOTES_BOX",
    "PERSIST",
    "SEL_CLASSES",
    "SEL_HELDOUT",
    "SEL_IDS",
    "SEL_MODE",
    "SEL_N",
    "SEL_NONTARGET",
    "SEL_SEED",
    "SWEEP_COLOR",
    "SWEEP_OPENED",
    "SWEEP_TARGET",
    "TOP_K",
    "UPLOAD",
    "URL_APPLIED",
    "URL_KEYS",
    "VERDICT_BOX",
]

BUNDLE = "bundle"  # name of the chosen bundle (sidebar)
DATA = "data_source"  # "bundle", "demo" or "upload" (sidebar)
UPLOAD = "upload"  # the uploaded .h5ad (sidebar)
DEMO_EPOCHS = "demo_epochs"  # generator epochs of the Home page's demo training (tests set it)

SEL_MODE = "sel_mode"  # "class", "id" or "random"
SEL_CLASSES = "sel_classes"
SEL_IDS = "sel_ids"
SEL_N = "sel_n"
SEL_SEED = "sel_seed"
SEL_HELDOUT = "sel_heldout"  # held-out samples only (bundle's own dataset)
SEL_NONTARGET = "sel_nontarget"  # leave the target class out of random picks
HEAT_VIEW = "heat_view"  # "mean" or "sample"
HEAT_SAMPLE = "heat_sample"
TOP_K = "top_k"
MAP_CLASSES = "map_classes"  # the map's classes besides the target (Map page)
MAP_AUTO = "map_classes_auto"  # the default last put in MAP_CLASSES: until changed, it follows the selection
MAP_SEED = "map_seed"
MAP_MOVES = "map_moves"  # draw each selected sample's move (before -> after) on the map
MAP_JOINT = "map_joint_for"  # (map key, samples) the joint map was asked for
GENE = "gene"
GENES_SOURCE = "genes_source"  # the Genes page's source class (or ALL_SOURCES)
ALL_SOURCES = "all sources"  # the Genes page's view over every source class of the selection
ENR_WHAT = "enr_what"  # "consensus" or a sample id
ENR_DIRECTION = "enr_direction"
ENR_LIBRARIES = "enr_libraries"
ENR_BACKEND = "enr_backend"
ENR_THRESHOLD = "enr_threshold"
ENR_GMTS = "enr_gmts"  # the offline GMT files to use (paths)
ENR_GMTS_OFFERED = "enr_gmts_offered"  # every GMT offered so far: one offered anew starts selected

SWEEP_COLOR = "sweep_color"  # the Sweep page's heatmap colour: accuracy, verdict or e_distance
SWEEP_TARGET = "sweep_target"  # the Sweep page's target for Table 1 and the recurring genes
SWEEP_OPENED = "sweep_opened"  # the bundle the Sweep page last opened (a message)
NOTES = "url_notes"  # notes on what of the URL's view was ignored (shown at the top, once)
NOTES_BOX = "_notes_box"  # this run's container for them, at the top of the page
VERDICT_BOX = "_verdict_box"  # this run's container for the selection's verdict, under the title
URL_KEYS = "url_keys"  # keys whose value came from the URL in this session
URL_APPLIED = "url_applied"  # the URL's view was read (once per session: a reload is a new session)

# Page widgets whose value must survive a change of page (Streamlit forgets the value of a
# widget that is not drawn in a run; re-assigning it keeps it).
PERSIST = (
    SEL_MODE,
    SEL_CLASSES,
    SEL_IDS,
    SEL_N,
    SEL_SEED,
    SEL_HELDOUT,
    SEL_NONTARGET,
    HEAT_VIEW,
    HEAT_SAMPLE,
    TOP_K,
    MAP_CLASSES,
    MAP_SEED,
    MAP_MOVES,
    SWEEP_COLOR,
    SWEEP_TARGET,
    GENE,
    GENES_SOURCE,
    ENR_WHAT,
    ENR_DIRECTION,
    ENR_LIBRARIES,
    ENR_BACKEND,
    ENR_THRESHOLD,
    ENR_GMTS,
)
DEFAULTS = {
    DATA: "bundle",
    SEL_MODE: "random",
    SEL_N: 20,
    SEL_SEED: 0,
    SEL_HELDOUT: True,
    SEL_NONTARGET: True,
    HEAT_VIEW: "mean",
    TOP_K: 20,
    MAP_SEED: 0,
    MAP_MOVES: True,
    SWEEP_COLOR: "accuracy",
    GENES_SOURCE: ALL_SOURCES,
    ENR_WHAT: "consensus",
    ENR_DIRECTION: "both",
    ENR_BACKEND: "auto",
    ENR_THRESHOLD: 1e-4,
}
DATA_CHOICES = {
    "bundle": "The bundle's own dataset",
    "demo": "Demo: pbmc68k_reduced",
    "upload": "Upload a .h5ad file",
}
MAX_UPLOAD_MB = 200
# q below which an enrichment term is "significant"; 1e-4 as in the paper
ENRICHMENT_THRESHOLDS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1)
