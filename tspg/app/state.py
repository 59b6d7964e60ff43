"""Session state of the dashboard: its keys (:mod:`tspg.app.keys`), their defaults, widget
values kept across pages, and the view kept in the URL (:mod:`tspg.app.query`)."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from . import keys as _keys
from . import query
from .keys import *  # noqa: F403  (the keys are this module's names: S.BUNDLE, ...)

__all__ = [
    *_keys.__all__,
    "init_state",
    "note",
    "note_dropped",
    "read_url",
    "set_state",
    "finish",
    "show_notes",
    "stop",
    "write_url",
]


def init_state() -> None:
    """Defaults for the shared keys, and keep page widgets' values across pages."""
    ss = st.session_state
    for key, value in _keys.DEFAULTS.items():
        ss.setdefault(key, value)
    for key in _keys.PERSIST:
        if key in ss:
            ss[key] = ss[key]


def set_state(key: str, value) -> None:
    """A button's ``on_click``: record the click in session state (it survives any rerun)."""
    st.session_state[key] = value


# ----------------------------------------------------------------------------- the URL


def read_url(bundles: Sequence[str]) -> None:
    """Once per session (a reload is a new session): the view in the URL's query parameters
    into session state; what cannot be used is left out with a note (:func:`show_notes`)."""
    ss = st.session_state
    if ss.get(_keys.URL_APPLIED):
        return
    ss[_keys.URL_APPLIED] = True
    params = {name: st.query_params.get_all(name) for name in st.query_params}
    values, notes = query.decode(params, bundles=bundles)
    for key, value in values.items():
        ss[key] = value
    if _keys.MAP_CLASSES in values:
        ss.pop(_keys.MAP_AUTO, None)  # the link's classes were picked, not a default
    if values.get(_keys.DATA) == "upload":
        notes.append("the link's uploaded file is not part of it: upload the file again")
    ss[_keys.URL_KEYS] = set(values)
    for msg in notes:
        note(msg)


def write_url() -> None:
    """The current view into the URL's query parameters (those that differ from defaults)."""
    ss = st.session_state
    state = {k: ss[k] for k in (p.key for p in query.PARAMS) if k in ss}
    if state.get(_keys.MAP_CLASSES) is not None and state.get(_keys.MAP_CLASSES) == ss.get(
        _keys.MAP_AUTO
    ):
        del state[_keys.MAP_CLASSES]  # the default follows the selection: not part of the view
    wanted = query.encode(state, defaults=_keys.DEFAULTS)
    current = {name: st.query_params.get_all(name) for name in st.query_params}
    if current != wanted:
        st.query_params.from_dict(wanted)


def note(message: str) -> None:
    """A note for the top of the page (shown once, by :func:`show_notes`)."""
    st.session_state.setdefault(_keys.NOTES, []).append(message)


def note_dropped(key: str, dropped: Sequence, what: str) -> None:
    """Note the values of ``key`` a page could not use, when they came from the URL."""
    ss = st.session_state
    if dropped and key in ss.get(_keys.URL_KEYS, ()):
        shown = ", ".join(map(str, list(dropped)[:5])) + (" …" if len(dropped) > 5 else "")
        note(f"{what} from the link ignored: {shown}")
        ss[_keys.URL_KEYS] = ss[_keys.URL_KEYS] - {key}


def finish() -> None:
    """The end of every run: the pending notes into the box at the top of the page, the
    view into the URL. (Streamlit drops what a script does after ``st.stop()``, so pages
    stop through :func:`stop`, which finishes first.)"""
    show_notes(st.session_state.get(_keys.NOTES_BOX))
    write_url()


def stop() -> None:
    """``st.stop()``, after :func:`finish`: the URL and the notes stay right."""
    finish()
    st.stop()


def show_notes(box) -> None:
    """The pending notes in ``box`` (a container at the top of the page), then forgotten."""
    notes = st.session_state.pop(_keys.NOTES, [])
    if notes and box is not None:
        box.warning(
            "Parts of the link could not be used and were ignored:\n\n"
            + "\n".join(f"- {n}" for n in notes),
            icon=":material/link_off:",
        )
