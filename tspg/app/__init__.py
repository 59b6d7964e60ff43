"""The dashboard's glue: everything ``streamlit_app.py`` and ``app_pages/`` share.

- :mod:`tspg.app.keys`: session-state keys and their defaults (no streamlit)
- :mod:`tspg.app.state`: the widgets' memory across pages, the view read from and written
  to the URL (:mod:`tspg.app.query` encodes and checks it, no streamlit), notes, stopping
- :mod:`tspg.app.loaders`: cached loaders (bundles, data, perturbations, maps, baselines,
  enrichment), keyed by plain strings
- :mod:`tspg.app.render`: charts, tables, downloads, verdict badges, gene-matching notes,
  the "equivalent command" box and the error guard of every page
- :mod:`tspg.app.selection` and :mod:`tspg.app.views`: pure logic (which samples, which
  classes on the map, frames and commands) with explicit arguments; they import no
  streamlit and are tested without it

Only this package imports streamlit inside ``tspg``; importing ``tspg.app`` itself does not.
"""

from __future__ import annotations

__all__: list[
    str
] = []  # import the submodules themselves (star-importing them would load streamlit)
