"""The annotator's local web server: one page (every asset in the package, nothing from a CDN) and a JSON API.

Bound to 127.0.0.1 by default on a free port; every request needs the session's token (``?token=`` in the URL,
as Jupyter prints it, or the ``X-Token`` header the page sends), else it is refused (403). Requests name images
by their index in the queue, never by path: a path is refused (404). A malformed body is refused (400) with what
is wrong.

API (JSON): ``GET /api/queue``, ``GET /api/image/<i>`` (the image as PNG; 422 with the reason if it cannot be
read), ``GET /api/state/<i>`` (its objects, each mask as row-major run lengths for the page to draw),
``POST /api/action/<i>`` (``{"action": accept|reject|delete|click|box|undo|done|select, "object", "x", "y",
"label", "box", "seconds"}``, see :class:`samtune.annotate.session.AnnotationSession`).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from samtune.annotate.session import ActionError, AnnotationSession
from samtune.annotate.store import decode

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
ASSETS = {"app.js": "text/javascript", "app.css": "text/css"}  # the only files served besides the page
MAX_BODY = 1 << 16


def mask_runs(mask: np.ndarray) -> list[int]:
    """Row-major run lengths of a bool mask, starting with a run of False (possibly 0): what the page draws."""
    flat = mask.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] + counts) if flat.size and flat[0] else counts


def client_state(state: dict) -> dict:
    """An image's state as the page needs it: no history (its length only), masks as run lengths."""
    objects = []
    for obj in state["objects"]:
        view = {k: obj.get(k) for k in ("id", "status", "n_clicks", "predicted_iou", "source", "clicks", "box")}
        view["runs"] = mask_runs(decode(obj["rle"]))
        objects.append(view)
    return {"image": state["image"], "size": state["size"], "reviewed": state["reviewed"], "failed": state["failed"],
            "history": len(state["history"]), "objects": objects}


class _Handler(BaseHTTPRequestHandler):
    server: AnnotatorServer

    def log_message(self, fmt: str, *args) -> None:  # requests go to the debug log, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def _authorised(self, query: dict) -> bool:
        token = self.headers.get("X-Token") or (query.get("token") or [""])[0]
        return secrets.compare_digest(token, self.server.token)

    def _route(self) -> tuple[str, dict] | None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            self._error(HTTPStatus.FORBIDDEN, "a valid token is required (the URL the annotator printed)")
            return None
        return url.path, query

    # ------------------------------------------------------------------ GET
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        session = self.server.session
        try:
            if path in ("/", "/index.html"):
                page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{TOKEN}}", self.server.token)
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if path.startswith("/static/"):
                name = path[len("/static/"):]
                if name not in ASSETS:
                    return self._error(HTTPStatus.NOT_FOUND, f"no asset {name!r}")
                return self._send(200, (STATIC / name).read_bytes(), ASSETS[name])
            if path == "/api/queue":
                return self._json(session.queue())
            match = re.fullmatch(r"/api/(image|state)/(\d+)", path)
            if match is None:
                return self._error(HTTPStatus.NOT_FOUND, f"no such resource {path!r} (images are named by index)")
            kind, index = match.group(1), int(match.group(2))
            session.record(index)
            if kind == "image":
                try:
                    image = session.image(index)
                except Exception as exc:  # noqa: BLE001 - shown on the page, the queue goes on
                    session.mark_failed(index, exc)
                    session.prepare_ahead(index)
                    return self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
                ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                session.prepare_ahead(index)
                return self._send(200, buf.tobytes(), "image/png")
            try:
                state = session.state(index)
            except Exception as exc:  # noqa: BLE001 - shown on the page
                return self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
            return self._json(client_state(state))
        except ActionError as exc:
            return self._error(HTTPStatus.NOT_FOUND, str(exc))

    # ------------------------------------------------------------------ POST
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        routed = self._route()
        if routed is None:
            return
        path, _ = routed
        match = re.fullmatch(r"/api/action/(\d+)", path)
        if match is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no such resource {path!r}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        if not 0 < length <= MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object of at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}")
        if not isinstance(body, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        index = int(match.group(1))
        try:
            self.server.session.record(index)
        except ActionError as exc:
            return self._error(HTTPStatus.NOT_FOUND, str(exc))
        try:
            state = self.server.session.act(index, body)
        except ActionError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. an image that cannot be read
            log.exception("action %s on image %d failed", body.get("action"), index)
            return self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
        self._json(client_state(state))


class AnnotatorServer(ThreadingHTTPServer):
    """The annotator's HTTP server around one :class:`AnnotationSession`.

    Args:
        session: The session.
        host: Address to bind (127.0.0.1: this machine only).
        port: Port (0: a free one).
        token: Access token (None: a new random one).
    """

    daemon_threads = True

    def __init__(self, session: AnnotationSession, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.session = session
        self.token = token or secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/?token={self.token}"

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, notebooks); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread
