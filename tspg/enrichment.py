"""Functional profiling of top genes: Enrichr online (through gseapy), GMT files offline.

Two backends give one table:

- ``"enrichr"``: the Enrichr web service (Ma'ayan lab), reached through gseapy's
  :class:`gseapy.enrichr.Enrichr` client. gseapy's ``gseapy.enrichr()`` helper is not used
  because it resets the server address to maayanlab.cloud, sends requests without any
  timeout and retries each one up to five times with exponential back-off, so a dead server
  can hold the dashboard for minutes. We build the ``Enrichr`` object ourselves, point it
  at the service's address and give it a requests session that knows the deadline (see
  :class:`_DeadlineSession`); the whole exchange also runs in a daemon thread that we stop
  waiting for at the deadline. Enrichr uses its own genome-wide background. urllib3's
  "Retrying ..." warnings from that thread are dropped: the outcome is reported once, by us.
- ``"offline"``: a hypergeometric test with :func:`gseapy.enrich` against gene sets read
  from GMT files, with the genes the model was trained on as the background. Nothing is
  sent over the network. :func:`offline_gmt_files` lists the files for a bundle: the
  bundled blood-cell marker sets, the file the bundle's gene set was read from, every
  ``*.gmt`` in ``$TSPG_GMT_DIR`` and any the caller adds.

``"auto"`` tries Enrichr and, when it cannot be used, says why in one log line and in
:attr:`EnrichmentResult.message` and answers offline instead.

In both backends only terms sharing at least one gene with the query are reported, and
``q`` is the Benjamini-Hochberg adjusted ``p`` computed here, per library. By default the
correction runs over the reported terms only, as Enrichr and gseapy do, so the column means
the same thing whichever backend answered; this is lenient when a library holds many sets
that share no gene with the list. Offline, ``correct_over="all"`` corrects over every set of
the library that has a gene in the background instead. The result's message says which.

Environment variables:

``TSPG_ENRICHR_URL``
    Base address of the Enrichr service (default :data:`ENRICHR_URL`), e.g. a local mirror
    or a test server; an explicit ``url`` argument wins.
``TSPG_GMT_DIR``
    A folder whose ``*.gmt`` files are offline libraries.
``TSPG_CACHE_DIR``
    Root of the result cache (see below).

Results are cached on disk as CSV files (never pickle), one per gene list and library,
under ``cache_dir`` (default ``$TSPG_CACHE_DIR/enrichment`` or
``~/.cache/tspg/enrichment``). An Enrichr result found in the cache is used without
asking the server, so it stays available when the network is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import UserError

if TYPE_CHECKING:
    from .bundle import Bundle

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LIBRARIES",
    "ENRICHR_URL",
    "MARKER_GMT",
    "EnrichmentResult",
    "EnrichrError",
    "enrich",
    "enrich_directions",
    "offline_gmt_files",
]

#: Default base address of the Enrichr service; ``$TSPG_ENRICHR_URL`` overrides it.
ENRICHR_URL = "https://maayanlab.cloud/Enrichr"
#: Enrichr libraries asked for by default: biological processes (GO 2025 release), the
#: 50 MSigDB hallmark programmes, and cell-type markers (CellMarker 2.0, 2024 release).
DEFAULT_LIBRARIES: tuple[str, ...] = (
    "GO_Biological_Process_2025",
    "MSigDB_Hallmark_2020",
    "CellMarker_2024",
)
#: Bundled GMT of human blood cell-type marker sets (always part of the offline backend).
MARKER_GMT: Path = Path(__file__).parent / "data" / "blood_markers.gmt"

#: Columns of :attr:`EnrichmentResult.table`, in this order.
COLUMNS: tuple[str, ...] = (
    "library",
    "term",
    "overlap",
    "n_overlap",
    "p",
    "q",
    "genes",
    "backend",
    "significant",
)
_CACHE_VERSION = 1
_Q_OVERLAPPING = "q: Benjamini-Hochberg per library over the terms sharing a gene with the list."
_OVERLAP_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class EnrichrError(RuntimeError):
    """Enrichr could not be used: unreachable, too slow, or an answer that cannot be read."""


@dataclass(frozen=True)
class EnrichmentResult:
    """Outcome of :func:`enrich`.

    Attributes
    ----------
    table
        One row per (library, term) sharing at least one gene with the query, sorted by
        ``q`` then ``p``. Columns: ``library``, ``term``, ``overlap`` (``"hits/set size"``,
        as Enrichr writes it), ``n_overlap`` (int), ``p`` (hypergeometric / Fisher p),
        ``q`` (Benjamini-Hochberg adjusted ``p`` within the library, over the terms sharing
        a gene with the query unless ``correct_over="all"``), ``genes`` (the
        overlapping genes, ``";"``-joined), ``backend`` and ``significant`` (``q <
        threshold``).
    backend
        ``"enrichr"`` or ``"offline"``: which backend produced the table.
    message
        Sentences for the user: which gene sets were used, which sets ``q`` was corrected
        over and, when ``"auto"`` fell back offline, why Enrichr could not be used.
    from_cache
        True when every library's table was read from the on-disk cache.
    """

    table: pd.DataFrame
    backend: Literal["enrichr", "offline"]
    message: str = ""
    from_cache: bool = False


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def enrich(
    genes: Iterable[str],
    *,
    background: Iterable[str] | None,
    libraries: Sequence[str] | None = None,
    gmt_files: Sequence[str | os.PathLike[str]] | None = None,
    backend: Literal["auto", "enrichr", "offline"] = "auto",
    threshold: float = 1e-4,
    correct_over: Literal["overlapping", "all"] = "overlapping",
    timeout: float = 10.0,
    retries: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
) -> EnrichmentResult:
    """Test a gene list for over-represented gene sets.

    Parameters
    ----------
    genes
        Gene symbols to profile, e.g. the 20 genes with the largest perturbation.
        Duplicates and blanks are dropped; order does not matter.
    background
        The genes the model was trained on: the universe of the offline hypergeometric
        test (gene sets are cut down to it, query genes outside it are ignored). Not used
        by Enrichr, which tests against its own genome-wide background. May be None only
        with ``backend="enrichr"``.
    libraries
        Enrichr library names (default :data:`DEFAULT_LIBRARIES`). Online only.
    gmt_files
        The gene-set files of the offline backend, exactly these; default
        :func:`offline_gmt_files` without a bundle (:data:`MARKER_GMT` and every ``*.gmt``
        in ``$TSPG_GMT_DIR``). Pass ``offline_gmt_files(bundle, extra=...)`` to add the
        bundle's own gene-set file. A file named twice is read once. GMT, or the reference
        implementation's list format for other suffixes (see
        :func:`tspg.genesets.read_gene_sets`); each file's stem is its library name; lines
        starting with ``#`` are comments.
    backend
        ``"enrichr"`` (online only; raises :class:`EnrichrError` on failure),
        ``"offline"`` (GMT files only, never touches the network) or ``"auto"`` (Enrichr,
        else offline with the reason in ``message``).
    threshold
        ``significant`` is ``q < threshold``.
    correct_over
        The sets the Benjamini-Hochberg correction runs over, per library:
        ``"overlapping"`` (the reported terms, those sharing at least one gene with the
        list, as Enrichr and gseapy do) or ``"all"`` (every set with at least one gene in
        the background; stricter, offline only, since Enrichr does not say how many terms
        it tested).
    timeout
        Hard limit in seconds for the whole Enrichr exchange, retries included.
    retries
        How many times a failed request (connection error, read timeout, HTTP 5xx) is
        repeated within ``timeout``.
    cache_dir
        Folder of the result cache; default ``$TSPG_CACHE_DIR/enrichment`` or
        ``~/.cache/tspg/enrichment``.
    url
        Base address of the Enrichr service; default ``$TSPG_ENRICHR_URL``, else
        :data:`ENRICHR_URL`.

    Returns
    -------
    EnrichmentResult
        The table, the backend that produced it, a message and whether it came from the
        cache.

    Raises
    ------
    ValueError
        Empty gene list or background, bad option, missing or malformed GMT file.
    EnrichrError
        ``backend="enrichr"`` and Enrichr could not be used.
    """
    result, _ = _enrich(
        genes,
        background=background,
        libraries=libraries,
        gmt_files=gmt_files,
        backend=backend,
        threshold=threshold,
        correct_over=correct_over,
        timeout=timeout,
        retries=retries,
        cache_dir=cache_dir,
        url=url,
        known_failure=None,
    )
    return result


def offline_gmt_files(
    bundle: Bundle | None = None, *, extra: Sequence[str | os.PathLike[str]] = ()
) -> list[Path]:
    """The gene-set files the offline backend should read for a bundle.

    Parameters
    ----------
    bundle
        A loaded bundle, or None. Its ``manifest["gene_set"]`` records the gene set the
        model was trained on (``name``) and the file it was read from (``source``). That
        file is included when it still exists and still holds a set of that name (a GMT,
        or the reference implementation's list format); otherwise it is left out and the
        reason logged (a plain ``--genes`` list, all genes, a moved or changed file). A
        relative ``source`` is read from the current folder.
    extra
        More files (e.g. the command line's ``--gmt``), checked when they are read.

    Returns
    -------
    list of Path
        In this order: :data:`MARKER_GMT`, the bundle's gene-set file, every ``*.gmt`` in
        ``$TSPG_GMT_DIR`` (sorted), then ``extra``. Pass it as ``gmt_files`` to
        :func:`enrich` or :func:`enrich_directions`.
    """
    from .genesets import read_gene_sets

    if isinstance(extra, (str, os.PathLike)):
        extra = (extra,)
    paths = [MARKER_GMT]
    info = (bundle.manifest.get("gene_set") or {}) if bundle is not None else {}
    source, name = info.get("source"), info.get("name")
    if source:
        try:
            if name not in read_gene_sets(source):
                raise ValueError(f"{source}: no gene set {name!r} any more")
            paths.append(Path(source))
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            logger.info("The bundle's gene-set file is not used for enrichment (%s).", exc)
    env_dir = os.environ.get("TSPG_GMT_DIR")
    if env_dir:
        if Path(env_dir).is_dir():
            paths += sorted(Path(env_dir).glob("*.gmt"))
        else:
            logger.warning("TSPG_GMT_DIR=%s is not a folder; ignored.", env_dir)
    return paths + [Path(p) for p in extra]


def enrich_directions(
    up: Iterable[str] | None,
    down: Iterable[str] | None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Profile the up- and down-perturbed gene lists and stack the results.

    Parameters
    ----------
    up, down
        Genes with the largest positive / negative perturbation. An empty or None list
        is skipped (and said so in the messages); both empty is an error.
    **kwargs
        Passed to :func:`enrich` (``background`` is required).

    Returns
    -------
    pandas.DataFrame
        ``direction`` (``"up"`` / ``"down"``) followed by the columns of
        :attr:`EnrichmentResult.table`. ``df.attrs`` holds ``"messages"``, ``"backend"``
        and ``"from_cache"``, each a dict keyed by direction.

    Notes
    -----
    When Enrichr fails for the ``up`` list in ``"auto"`` mode, the ``down`` list goes
    offline at once (cached Enrichr results are still used) instead of waiting for the
    timeout a second time, and the failure is logged once.
    """
    lists = {
        "up": _as_gene_list(up, allow_empty=True),
        "down": _as_gene_list(down, allow_empty=True),
    }
    if not lists["up"] and not lists["down"]:
        raise UserError("Both the up and the down gene lists are empty; nothing to enrich.")
    frames: list[pd.DataFrame] = []
    messages: dict[str, str] = {}
    backends: dict[str, str] = {}
    from_cache: dict[str, bool] = {}
    failure: str | None = None
    for direction, genes in lists.items():
        if not genes:
            messages[direction] = f"No {direction}-regulated genes were given."
            continue
        result, failed = _enrich(genes, known_failure=failure, **kwargs)
        failure = failure or failed
        frames.append(result.table.assign(direction=direction))
        messages[direction] = result.message
        backends[direction] = result.backend
        from_cache[direction] = result.from_cache
    out = pd.concat(frames, ignore_index=True)[["direction", *COLUMNS]]
    out.attrs = {"messages": messages, "backend": backends, "from_cache": from_cache}
    return out


# --------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------


def _enrich(
    genes: Iterable[str],
    *,
    background: Iterable[str] | None,
    libraries: Sequence[str] | None = None,
    gmt_files: Sequence[str | os.PathLike[str]] | None = None,
    backend: str = "auto",
    threshold: float = 1e-4,
    correct_over: str = "overlapping",
    timeout: float = 10.0,
    retries: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    known_failure: str | None = None,
) -> tuple[EnrichmentResult, str | None]:
    """:func:`enrich`, also returning why Enrichr failed (None if it was not tried or worked).

    ``known_failure``: why Enrichr already failed in this call of :func:`enrich_directions`;
    Enrichr is then not asked again (only its cache is read) and the failure not logged again.
    """
    gene_list = _as_gene_list(genes)
    if backend not in ("auto", "enrichr", "offline"):
        raise UserError(f"backend must be 'auto', 'enrichr' or 'offline', not {backend!r}.")
    if correct_over not in ("overlapping", "all"):
        raise UserError(f"correct_over must be 'overlapping' or 'all', not {correct_over!r}.")
    if correct_over == "all" and backend != "offline":
        raise UserError(
            "correct_over='all' needs backend='offline': Enrichr reports only the terms that "
            "share a gene with the list, so the number of terms it tested is not known."
        )
    if not 0 < threshold <= 1:
        raise UserError(f"threshold must be in (0, 1], not {threshold!r}.")
    if not timeout > 0:
        raise UserError(f"timeout must be a positive number of seconds, not {timeout!r}.")
    if int(retries) != retries or retries < 0:
        raise UserError(f"retries must be a whole number >= 0, not {retries!r}.")
    bg_list: list[str] = []
    if backend != "enrichr":
        bg_list = _as_gene_list(background, what="background")
    if libraries is None:
        libraries = DEFAULT_LIBRARIES
    elif isinstance(libraries, str):
        libraries = (libraries,)
    libraries = tuple(dict.fromkeys(str(lib) for lib in libraries))
    cache = _cache_dir(cache_dir)
    url = url or os.environ.get("TSPG_ENRICHR_URL") or ENRICHR_URL

    failure: str | None = None
    if backend in ("auto", "enrichr"):
        if not libraries:
            raise UserError("No Enrichr library was named.")
        try:
            result = _enrich_online(
                gene_list,
                libraries,
                url=url,
                timeout=timeout,
                retries=int(retries),
                cache=cache,
                threshold=threshold,
                skip_reason=known_failure,
            )
            return result, None
        except EnrichrError as exc:
            if backend == "enrichr":
                raise
            failure = str(exc)
            if known_failure is None:
                logger.warning(
                    "Enrichr could not be used (%s); falling back to offline gene sets.", failure
                )

    result = _enrich_offline(
        gene_list,
        bg_list,
        gmt_files=gmt_files,
        cache=cache,
        threshold=threshold,
        correct_over=correct_over,
        failure=failure,
    )
    return result, failure


def _enrich_online(
    genes: list[str],
    libraries: tuple[str, ...],
    *,
    url: str,
    timeout: float,
    retries: int,
    cache: Path,
    threshold: float,
    skip_reason: str | None,
) -> EnrichmentResult:
    """Enrichr results per library, from the cache where possible, else from the server."""
    url = url.rstrip("/")
    paths = {lib: cache / f"{_cache_key(genes, lib, 'enrichr', url=url)}.csv" for lib in libraries}
    tables = {lib: _cache_read(path) for lib, path in paths.items()}
    missing = [lib for lib, table in tables.items() if table is None]
    if not missing:
        logger.info("Enrichr results for %d libraries read from the cache.", len(libraries))
        table = _finish(list(tables.values()), threshold)
        return EnrichmentResult(
            table,
            "enrichr",
            f"Enrichr results ({', '.join(libraries)}), from the cache. {_Q_OVERLAPPING}",
            True,
        )
    if skip_reason is not None:
        raise EnrichrError(skip_reason)

    raw, recognised = _query_enrichr(genes, missing, url=url, timeout=timeout, retries=retries)
    try:
        fetched = _from_gseapy(raw, backend="enrichr")
    except EnrichrError as exc:
        raise EnrichrError(f"the answer from {url} could not be read ({exc})") from exc
    unknown = [lib for lib in missing if lib not in recognised]
    for lib in missing:
        if lib in unknown:
            tables[lib] = _empty()
            continue
        tables[lib] = fetched[fetched["library"] == lib]
        _cache_write(paths[lib], tables[lib])
    message = f"Enrichr results ({', '.join(libraries)})."
    if unknown:
        message += f" Enrichr does not know the libraries {', '.join(unknown)}; they were skipped."
        logger.warning("Enrichr does not know the libraries %s.", ", ".join(unknown))
    message += f" {_Q_OVERLAPPING}"
    return EnrichmentResult(_finish(list(tables.values()), threshold), "enrichr", message, False)


def _enrich_offline(
    genes: list[str],
    background: list[str],
    *,
    gmt_files: Sequence[str | os.PathLike[str]] | None,
    cache: Path,
    threshold: float,
    correct_over: str,
    failure: str | None,
) -> EnrichmentResult:
    """Hypergeometric test against every offline GMT library."""
    bg_set = set(background)
    outside = [g for g in genes if g not in bg_set]
    if outside:
        logger.info(
            "%d of %d query genes are not in the background and are ignored offline: %s",
            len(outside),
            len(genes),
            ", ".join(outside[:10]),
        )
    bg_hash = _sha256(sorted(bg_set))
    tables: list[pd.DataFrame] = []
    n_tests: dict[str, int] = {}
    hits = 0
    libraries = _offline_libraries(gmt_files)
    for name, path in libraries.items():
        sets = _read_gmt(path)
        if correct_over == "all":
            n_tests[name] = _n_testable(sets, bg_set)
        key = _cache_key(
            genes, name, "offline", background=bg_hash, gmt=_sha256(sorted(sets.items()))
        )
        cache_path = cache / f"{key}.csv"
        table = _cache_read(cache_path)
        if table is None:
            table = _offline_library(genes, sets, name=name, background=bg_set)
            _cache_write(cache_path, table)
        else:
            hits += 1
        tables.append(table)
    names = ", ".join(path.name for path in libraries.values())
    where = f"offline results from {names} (hypergeometric test, background of {len(bg_set)} genes)"
    if failure is None:
        message = f"Showing {where}."
    else:
        message = f"Enrichr could not be used ({failure}); showing {where}."
    if correct_over == "all":
        counts = ", ".join(f"{n} in {name}" for name, n in n_tests.items())
        message += f" q: Benjamini-Hochberg per library over every gene set with a gene in the background ({counts})."
    else:
        message += f" {_Q_OVERLAPPING}"
    table = _finish(tables, threshold, n_tests=n_tests or None)
    return EnrichmentResult(table, "offline", message, hits == len(tables))


# --------------------------------------------------------------------------------------
# Enrichr through gseapy, under a hard time limit
# --------------------------------------------------------------------------------------


_THREAD_NAME = "tspg-enrichr"


def _not_from_enrichr_thread(record: logging.LogRecord) -> bool:
    """Drop urllib3's warnings ("Retrying (Retry(total=0, ...)) after connection broken by
    NameResolutionError ...") logged in our Enrichr thread: how the exchange ended is
    reported once, by :func:`enrich`. Records from any other thread pass."""
    return not (record.threadName == _THREAD_NAME and record.levelno < logging.ERROR)


# A filter, not a level change around the call: it holds for the Enrichr thread only, also
# when that thread outlives our wait, and concurrent calls cannot undo each other's setting.
logging.getLogger("urllib3.connectionpool").addFilter(_not_from_enrichr_thread)


class _DeadlineSession(requests.Session):
    """A requests session for gseapy whose every request ends by a fixed deadline.

    gseapy calls ``session.get(...)`` / ``session.post(...)`` without a timeout; here each
    request gets ``timeout = time left`` (connect and per-read), and a request that would
    start after the deadline fails at once. Retries are bounded by ``retries`` (connection
    errors, read timeouts, HTTP 500/502/503/504; ``Retry-After`` headers are not obeyed so
    a server cannot ask us to sleep past the deadline).
    """

    def __init__(self, deadline: float, retries: int) -> None:
        super().__init__()
        self.deadline = deadline
        policy = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            other=0,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False,  # hand back the last 5xx response: clearer than RetryError
            respect_retry_after_header=False,
        )
        adapter = HTTPAdapter(max_retries=policy)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:  # noqa: D102
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise requests.exceptions.Timeout(f"time limit reached before {method} {url}")
        kwargs["timeout"] = remaining
        return super().request(method, url, *args, **kwargs)


def _query_enrichr(
    genes: list[str],
    libraries: list[str],
    *,
    url: str,
    timeout: float,
    retries: int,
) -> tuple[pd.DataFrame | None, list[str]]:
    """Run gseapy's Enrichr client against ``url``; at most ``timeout`` seconds in total.

    How the limit is enforced: the exchange (GET datasetStatistics, POST addList, GET
    export per library) runs in a daemon thread, and we stop waiting for it at the
    deadline (``Thread.join(timeout)``). That alone is the hard guarantee: it also covers
    what socket timeouts miss (slow DNS, a server that trickles a byte every few seconds,
    back-off sleeps). The thread itself is kept short-lived by :class:`_DeadlineSession`,
    so an abandoned thread does not linger: its requests time out at the deadline and no
    new request starts after it. gseapy is imported before the clock starts (its first
    import takes about a second and is not network time).

    Returns
    -------
    raw, recognised
        gseapy's result table (``res2d``; None when nothing was returned) and the
        libraries Enrichr recognised.
    """
    import gseapy.enrichr  # noqa: F401 - imported here, first use takes ~1 s, not counted in timeout

    deadline = time.monotonic() + timeout
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = _gseapy_enrichr(
                genes, libraries, url=url, deadline=deadline, retries=retries
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=work, name=_THREAD_NAME, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise EnrichrError(f"no answer from {url} within {timeout:g} s")
    if "error" in box:
        raise EnrichrError(_describe(box["error"], url, timeout)) from box["error"]
    return box["value"]


def _gseapy_enrichr(
    genes: list[str],
    libraries: list[str],
    *,
    url: str,
    deadline: float,
    retries: int,
) -> tuple[pd.DataFrame | None, list[str]]:
    from gseapy.enrichr import Enrichr, EnrichrValidationError

    session = _DeadlineSession(deadline, retries)
    try:
        # outdir=None: no files, no plots. Built directly (not gseapy.enrichr()) so that
        # set_organism() does not reset base_url to maayanlab.cloud.
        with Enrichr(
            gene_list=list(genes), gene_sets=list(libraries), outdir=None, no_plot=True
        ) as enr:
            if not all(hasattr(enr, a) for a in ("_session", "base_url", "_logger")):
                raise EnrichrError(
                    "this gseapy version has no Enrichr._session/base_url to configure"
                )
            enr.close()  # drop the stderr handler gseapy gives each client; log through ours
            enr._logger = logging.getLogger(f"{__name__}.gseapy")
            enr._session.close()
            enr._session = session
            enr.base_url = url
            try:
                enr.run()
            except EnrichrValidationError as exc:
                raise EnrichrError(
                    f"Enrichr at {url} knows none of the libraries {', '.join(libraries)} ({exc})"
                ) from exc
            recognised = [lib for lib in libraries if lib in getattr(enr, "_gs_name", libraries)]
            return enr.res2d, recognised
    finally:
        session.close()


def _describe(exc: BaseException, url: str, timeout: float) -> str:
    """One line saying why Enrichr failed, for users and logs.

    gseapy wraps some requests errors in its own exceptions; the chain is searched for the
    underlying network error.
    """
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, requests.exceptions.RequestException):
        cause = cause.__cause__ or cause.__context__
    root = cause if cause is not None else exc
    text = " ".join(str(root).split())
    if len(text) > 160:
        text = text[:157] + "..."
    name = type(root).__name__
    if isinstance(root, requests.exceptions.Timeout) or "timed out" in text.lower():
        return f"no answer from {url} within {timeout:g} s ({name})"
    if isinstance(root, requests.exceptions.ConnectionError):
        # "HTTPSConnectionPool(...): Max retries exceeded ... [Errno 111] Connection refused"
        errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(root))
        detail = errno.group(1).strip() if errno else text
        return f"{url} could not be reached ({name}: {detail})"
    if isinstance(root, requests.exceptions.HTTPError) or "status code" in text:
        return f"{url} answered with an error ({name}: {text})"
    if isinstance(root, EnrichrError):
        return text
    return f"the answer from {url} could not be read ({name}: {text})"


# --------------------------------------------------------------------------------------
# offline backend
# --------------------------------------------------------------------------------------


def _offline_libraries(gmt_files: Sequence[str | os.PathLike[str]] | None) -> dict[str, Path]:
    """Offline libraries by name (file stem): ``gmt_files``, default :func:`offline_gmt_files`.

    A file named twice, or two files with the same name and the same content, count once.
    """
    if isinstance(gmt_files, (str, os.PathLike)):
        gmt_files = (gmt_files,)
    paths = offline_gmt_files() if gmt_files is None else [Path(p) for p in gmt_files]
    if not paths:
        raise UserError("no offline gene-set files given")
    libs: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise UserError(f"GMT file not found: {path}")
        other = libs.get(path.stem)
        if other is not None:
            if other.resolve() == path.resolve() or other.read_bytes() == path.read_bytes():
                continue
            raise UserError(
                f"Two GMT files would both be called {path.stem!r}: {other} and {path}. Rename one."
            )
        libs[path.stem] = path
    return libs


def _read_gmt(path: Path) -> dict[str, list[str]]:
    """Read a GMT file with :func:`tspg.genesets.read_gene_sets` (skips ``#`` comments, names the bad line).

    gseapy's own GMT reader keeps ``#`` lines that happen to contain two tabs as gene sets
    and silently drops malformed lines, so we parse the file here and hand gseapy a dict.
    """
    from .genesets import read_gene_sets

    return read_gene_sets(path)


def _n_testable(sets: dict[str, list[str]], background: set[str]) -> int:
    """How many sets have at least one gene in the background (matched as gseapy matches, ignoring case)."""
    bg = {g.upper() for g in background}
    return sum(1 for members in sets.values() if any(g.upper() in bg for g in members))


def _offline_library(
    genes: list[str],
    sets: dict[str, list[str]],
    *,
    name: str,
    background: set[str],
) -> pd.DataFrame:
    """gseapy's hypergeometric test of ``genes`` against one library (gene sets cut to the background)."""
    import gseapy

    # gseapy would log "No hits returned" as an error on stderr; a list sharing no gene
    # with any set simply has no rows. (Case-insensitive, as gseapy upper-cases a query
    # when the gene sets are upper case.)
    query = {g.upper() for g in genes} & {g.upper() for g in background}
    if not any(query & {g.upper() for g in members} for members in sets.values()):
        return _empty()
    enr = gseapy.enrich(
        gene_list=list(genes),
        gene_sets=sets,
        background=sorted(background),
        outdir=None,
        no_plot=True,
    )
    try:
        raw = enr.res2d
    finally:
        enr.close()
    table = _from_gseapy(raw, backend="offline")
    return table.assign(library=name)


# --------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "library": pd.Series(dtype=object),
            "term": pd.Series(dtype=object),
            "overlap": pd.Series(dtype=object),
            "n_overlap": pd.Series(dtype=int),
            "p": pd.Series(dtype=float),
            "q": pd.Series(dtype=float),
            "genes": pd.Series(dtype=object),
            "backend": pd.Series(dtype=object),
            "significant": pd.Series(dtype=bool),
        }
    )


def _from_gseapy(raw: pd.DataFrame | None, *, backend: str) -> pd.DataFrame:
    """gseapy / Enrichr columns (Gene_set, Term, Overlap, P-value, Genes) to ours."""
    if raw is None or len(raw) == 0:
        return _empty()
    needed = ["Gene_set", "Term", "Overlap", "P-value", "Genes"]
    lacking = [c for c in needed if c not in raw.columns]
    if lacking:
        raise EnrichrError(
            f"unexpected result table: no column {', '.join(lacking)} "
            f"(got {', '.join(map(str, raw.columns[:8]))})"
        )
    overlap = raw["Overlap"].astype(str)
    parsed = overlap.str.extract(_OVERLAP_RE)
    p = pd.to_numeric(raw["P-value"], errors="coerce")
    if parsed.isna().any().any() or p.isna().any() or not p.between(0, 1).all():
        raise EnrichrError(
            "unexpected result table: Overlap must read like '5/20' and P-value be in [0, 1]"
        )
    table = pd.DataFrame(
        {
            "library": raw["Gene_set"].astype(str).to_numpy(),
            "term": raw["Term"].astype(str).to_numpy(),
            "overlap": overlap.str.strip().to_numpy(),
            "n_overlap": parsed[0].astype(int).to_numpy(),
            "p": p.astype(float).to_numpy(),
            "q": np.nan,
            "genes": raw["Genes"].fillna("").astype(str).to_numpy(),
            "backend": backend,
            "significant": False,
        }
    )
    return table


def _bh(p: np.ndarray, n_tests: int | None = None) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1).

    ``n_tests``: the number of hypotheses tested, when more than ``p`` holds (the others
    had no reported p-value; counting them is the same as adding p = 1 for each).
    """
    p = np.asarray(p, dtype=float)
    if p.size == 0:
        return p.copy()
    n = max(p.size, n_tests or 0)
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * n / np.arange(1, p.size + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(p.size)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _finish(
    tables: list[pd.DataFrame], threshold: float, *, n_tests: dict[str, int] | None = None
) -> pd.DataFrame:
    """Concatenate per-library tables, recompute q per library, flag, sort.

    ``n_tests``: per library, the number of sets to correct over (default: its rows).
    """
    tables = [t for t in tables if len(t)]
    if not tables:
        return _empty()
    table = pd.concat(tables, ignore_index=True)
    table["q"] = np.nan
    for library, index in table.groupby("library", sort=False).groups.items():
        table.loc[index, "q"] = _bh(table.loc[index, "p"].to_numpy(), (n_tests or {}).get(library))
    table["n_overlap"] = table["n_overlap"].astype(int)
    table["significant"] = table["q"] < threshold
    table = table.sort_values(["q", "p", "library", "term"], kind="mergesort", ignore_index=True)
    return table[list(COLUMNS)]


# --------------------------------------------------------------------------------------
# input checks and cache
# --------------------------------------------------------------------------------------


def _as_gene_list(
    genes: Iterable[str] | None, *, what: str = "gene list", allow_empty: bool = False
) -> list[str]:
    if isinstance(genes, (str, bytes)):
        raise UserError(
            f"The {what} must be a list of gene symbols, not a single string ({genes[:40]!r})."
        )
    out = list(
        dict.fromkeys(
            str(g).strip() for g in (genes if genes is not None else ()) if str(g).strip()
        )
    )
    if not out and not allow_empty:
        raise UserError(f"The {what} is empty; give at least one gene symbol.")
    return out


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("TSPG_CACHE_DIR")
    return Path(root) / "enrichment" if root else Path.home() / ".cache" / "tspg" / "enrichment"


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _cache_key(genes: list[str], library: str, backend: str, **extra: str) -> str:
    """sha256 of the sorted genes, library, backend and (offline) background/GMT hashes."""
    return _sha256(
        {
            "v": _CACHE_VERSION,
            "genes": sorted(genes),
            "library": library,
            "backend": backend,
            **extra,
        }
    )


def _cache_read(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(
            path,
            keep_default_na=False,
            na_values={"p": [""], "q": [""]},
            dtype={"library": str, "term": str, "overlap": str, "genes": str, "backend": str},
        )
        if list(table.columns) != list(COLUMNS[:-1]):
            raise ValueError(f"columns {list(table.columns)}")
        table["n_overlap"] = table["n_overlap"].astype(int)
        table["p"] = table["p"].astype(float)
        table["significant"] = False
        return table[list(COLUMNS)]
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        logger.warning("Ignoring unreadable enrichment cache file %s (%s).", path, exc)
        return None


def _cache_write(path: Path, table: pd.DataFrame) -> None:
    """Write atomically (temporary file + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        table[list(COLUMNS[:-1])].to_csv(tmp, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("Could not write the enrichment cache %s (%s).", path, exc)
