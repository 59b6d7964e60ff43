"""A small local stand-in for the Enrichr REST API, for tests.

It speaks the endpoints gseapy's ``Enrichr`` client calls, under ``/Enrichr``:

- ``GET  /Enrichr/datasetStatistics`` -> ``{"statistics": [{"libraryName": ...}, ...]}``
- ``POST /Enrichr/addList`` (multipart: ``list``, ``description``) ->
  ``{"userListId": ..., "shortId": ...}``
- ``GET  /Enrichr/export?userListId=..&filename=..&backgroundType=LIB`` -> TSV table

``mode`` picks the behaviour: ``"ok"``, ``"nohits"`` (header-only tables), ``"slow"``
(every request waits ``delay`` seconds first), ``"http500"``, ``"bad_json"`` (addList
answers with something that is not JSON) and ``"garbage_export"`` (export answers with
text that is not an Enrichr table). Every request is counted in ``requests``.
"""

from __future__ import annotations

import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LIBRARIES = ("GO_Biological_Process_2025", "MSigDB_Hallmark_2020", "CellMarker_2024")
HEADER = [
    "Term",
    "Overlap",
    "P-value",
    "Adjusted P-value",
    "Old P-value",
    "Old Adjusted P-value",
    "Odds Ratio",
    "Combined Score",
    "Genes",
]
#: Rows the server returns for each library in "ok" mode: (term, set size, p, n hits).
#: The overlapping genes are the first n genes of the posted list.
ROWS = {
    "GO_Biological_Process_2025": [
        ("Inflammatory Response (GO:0006954)", 230, 2.0e-6, 5),
        ("Neutrophil Degranulation (GO:0043312)", 480, 1.0e-3, 4),
        ("Antigen Processing And Presentation (GO:0019882)", 90, 0.04, 1),
    ],
    "MSigDB_Hallmark_2020": [
        ("Inflammatory Response", 200, 3.0e-4, 3),
        ("Allograft Rejection", 200, 0.2, 1),
    ],
    "CellMarker_2024": [
        ("Classical Monocyte Blood Human", 120, 1.0e-9, 6),
        ("Natural Killer Cell Blood Human", 150, 0.5, 1),
    ],
}


class FakeEnrichr:
    """Threaded HTTP server on 127.0.0.1 (free port); use as a context manager."""

    def __init__(self, mode: str = "ok", *, delay: float = 5.0) -> None:
        self.mode = mode
        self.delay = delay
        self.requests: list[tuple[str, str]] = []
        self.lists: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a sleeping "slow" handler must not block close
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/Enrichr"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def __enter__(self) -> FakeEnrichr:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # ----------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def _send(self, status: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake._lock:
                    fake.requests.append((method, parsed.path))
                if fake.mode == "slow" and fake._stop.wait(fake.delay):
                    return
                if fake.mode == "http500":
                    self._send(500, "<html><body>Internal Server Error</body></html>", "text/html")
                    return
                endpoint = parsed.path.rsplit("/", 1)[-1]
                query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
                if method == "GET" and endpoint == "datasetStatistics":
                    stats = [{"libraryName": lib, "numTerms": 100} for lib in LIBRARIES]
                    self._send(200, json.dumps({"statistics": stats}), "application/json")
                elif method == "POST" and endpoint == "addList":
                    if fake.mode == "bad_json":
                        self._send(200, '{"userListId": 12345, "shortId": ', "application/json")
                        return
                    genes = self._posted_genes(body)
                    with fake._lock:
                        list_id = 1000 + len(fake.lists)
                        fake.lists[list_id] = genes
                    self._send(
                        200,
                        json.dumps({"userListId": list_id, "shortId": "abc123"}),
                        "application/json",
                    )
                elif method == "GET" and endpoint == "export":
                    if fake.mode == "garbage_export":
                        self._send(200, "\x00\x01<html>oops</html>\nnot;a;table", "text/plain")
                        return
                    genes = fake.lists.get(int(query.get("userListId", -1)), [])
                    self._send(
                        200,
                        _export_tsv(query.get("backgroundType", ""), genes, fake.mode),
                        "text/plain",
                    )
                else:
                    self._send(404, "not found", "text/plain")

            def _posted_genes(self, body: bytes) -> list[str]:
                ctype = self.headers.get("Content-Type", "")
                message = BytesParser(policy=HTTP).parsebytes(
                    b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
                )
                for part in message.iter_parts():
                    if part.get_param("name", header="content-disposition") == "list":
                        return [g for g in part.get_content().split("\n") if g.strip()]
                return []

        return Handler


def _export_tsv(library: str, genes: list[str], mode: str) -> str:
    lines = ["\t".join(HEADER)]
    if mode != "nohits":
        for term, size, p, hits in ROWS.get(library, []):
            hit_genes = genes[:hits]
            lines.append(
                "\t".join(
                    [
                        term,
                        f"{len(hit_genes)}/{size}",
                        f"{p:g}",
                        f"{min(1.0, p * 3):g}",
                        "0",
                        "0",
                        "12.5",
                        "80.1",
                        ";".join(hit_genes),
                    ]
                )
            )
    return "\n".join(lines) + "\n"


def closed_port_url() -> str:
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/Enrichr"
