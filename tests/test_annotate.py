"""The annotator: its API (token, bad requests, saving, resume) and, in a real browser, the page."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from samtune.annotate.server import AnnotatorServer
from samtune.annotate.session import AnnotationSession
from samtune.annotate.store import ReviewStore, decode
from samtune.data.records import ImageRecord
from samtune.model import build_model
from samtune.predict.segmenter import Segmenter
from samtune.predict.zoom import ZoomConfig
from samtune.prompts import center_points
from tests.blob_data import write_disc_dataset

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def model():
    return build_model("sam_tiny", checkpoint=str(ROOT / "data" / "checkpoints" / "sam_tiny_generalist.pt")).eval()


@pytest.fixture
def dataset(tmp_path):
    root = write_disc_dataset(tmp_path / "data", "val", 3)
    records = [ImageRecord(image_path=root / "val" / "images" / f"discs_{i}.png", rel_path=f"discs_{i}.png",
                           split="val", mask_path=root / "val" / "masks" / f"discs_{i}.png") for i in range(3)]
    return root, records


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _serve(model, records, out: Path, **kw) -> AnnotatorServer:
    session = AnnotationSession(model, records, ReviewStore(out), zoom=ZoomConfig(context=2.0),
                                model_sha256="test", **kw)
    server = AnnotatorServer(session)
    server.start_background()
    return server


def _call(server: AnnotatorServer, path: str, body=None, *, token: str | None = None, raw: bytes | None = None):
    """(status, parsed JSON or bytes) of a request to ``server``."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    host, port = server.server_address[:2]
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method="POST" if data is not None else "GET")
    req.add_header("X-Token", server.token if token is None else token)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            payload, status, kind = res.read(), res.status, res.headers.get("Content-Type")
    except urllib.error.HTTPError as err:
        payload, status, kind = err.read(), err.code, err.headers.get("Content-Type")
    return status, json.loads(payload) if kind == "application/json" else payload


def test_the_api_refuses_what_it_should_and_saves_every_decision(model, dataset, tmp_path):
    root, records = dataset
    before = _digest(root)
    bad = root / "val" / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    records = [records[0], ImageRecord(image_path=bad, rel_path="broken.png", split="val",
                                       mask_path=root / "val" / "masks" / "discs_1.png"), records[1]]
    out = tmp_path / "reviews"
    server = _serve(model, records, out)
    try:
        assert _call(server, "/api/queue", token="wrong")[0] == 403
        assert _call(server, "/api/queue", token="")[0] == 403
        status, queue = _call(server, "/api/queue")
        assert status == 200 and queue["total"] == 3 and queue["current"] == 0
        for path in ("/api/image/7", "/api/image/..%2F..%2Fetc%2Fpasswd", "/static/../../pyproject.toml",
                     "/etc/passwd"):
            assert _call(server, path)[0] == 404, path
        status, error = _call(server, "/api/image/1")  # an image that cannot be read: said, the queue goes on
        assert status == 422 and "broken.png" in error["error"]
        assert _call(server, "/api/queue")[1]["images"][1]["failed"]
        assert _call(server, "/api/action/0", raw=b"{not json")[0] == 400
        assert _call(server, "/api/action/0", raw=b"[1, 2]")[0] == 400
        assert _call(server, "/api/action/0", {"action": "paint"})[0] == 400
        assert _call(server, "/api/action/0", {"action": "click", "object": None, "x": 999, "y": 1})[0] == 400
        assert _call(server, "/api/action/0", {"action": "accept", "object": 99})[0] == 400

        status, state = _call(server, "/api/state/0")
        assert status == 200 and len(state["objects"]) == 8 and {o["status"] for o in state["objects"]} == {"proposed"}
        _call(server, "/api/action/0", {"action": "accept", "object": 1, "seconds": 1.5})
        _call(server, "/api/action/0", {"action": "reject", "object": 2})
        # a negative click on proposal 3: its interior point, then this click, decoded as SAM's interactive loop
        gt3 = decode(ReviewStore(out).load("discs_0.png")["objects"][2]["rle"])
        cx, cy = (float(v) for v in center_points(torch.from_numpy(gt3)[None]).reshape(-1, 2)[0])
        _, state = _call(server, "/api/action/0", {"action": "click", "object": 3, "x": cx + 2, "y": cy, "label": 0})
        fixed = state["objects"][2]
        assert fixed["status"] == "fixed" and fixed["clicks"]["labels"] == [1, 0]
        _, state = _call(server, "/api/action/0", {"action": "box", "box": [60, 60, 100, 100]})
        assert state["objects"][-1]["status"] == "added" and state["objects"][-1]["box"] == [60, 60, 100, 100]
        _, state = _call(server, "/api/action/0", {"action": "undo"})
        assert [o["status"] for o in state["objects"]][:3] == ["accepted", "rejected", "fixed"]
        assert len(state["objects"]) == 8
    finally:
        server.shutdown()
        server.server_close()

    # on disk, as the project's formats: the saved fix is the model's answer to those clicks
    saved = ReviewStore(out).load("discs_0.png")
    segmenter = Segmenter(model, ZoomConfig(context=2.0))
    image = cv2.cvtColor(cv2.imread(str(records[0].image_path)), cv2.COLOR_BGR2RGB)
    predict = segmenter.click_predictor(image)
    pts = torch.tensor([saved["objects"][2]["clicks"]["points"]])
    labels = torch.tensor([saved["objects"][2]["clicks"]["labels"]], dtype=torch.int)
    masks, state_, _ = predict(pts[:, :1], labels[:, :1], None, True)
    masks, _, _ = predict(pts, labels, state_, False)
    assert np.array_equal(decode(saved["objects"][2]["rle"]), masks[0].numpy())
    ids = cv2.imread(str(out / "masks" / "discs_0.png"), cv2.IMREAD_UNCHANGED)
    assert ids.dtype == np.uint16 and len(np.unique(ids)) == 3  # background, the accepted and the fixed object
    coco = json.loads((out / "coco.json").read_text())
    statuses = sorted(a["status"] for a in coco["annotations"])
    assert statuses == ["accepted", "fixed", "rejected"]
    assert coco["annotations"][0]["provenance"]["model_sha256"] == "test"
    assert {a["status"]: a["provenance"]["seconds"] for a in coco["annotations"]}["accepted"] == 1.5
    bad.unlink()
    assert _digest(root) == before  # the user's images and labels are only read

    # killed and started again: every decision is there, the queue continues
    server = _serve(model, records[:1] + records[2:], out)
    try:
        _, state = _call(server, "/api/state/0")
        assert [o["status"] for o in state["objects"]][:3] == ["accepted", "rejected", "fixed"]
        _call(server, "/api/action/0", {"action": "done"})
        assert _call(server, "/api/queue")[1]["current"] == 1
        # a further click on the fixed object after the restart replays its clicks: the same answer as without it
        _, state = _call(server, "/api/action/0", {"action": "click", "object": 3, "x": cx - 2, "y": cy, "label": 1})
        assert state["objects"][2]["clicks"]["labels"] == [1, 0, 1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium (apt-get install chromium; .ci/run does)")
def test_the_page_in_a_real_browser(model, dataset, tmp_path):
    """Chromium through Playwright: accept, reject, fix with a negative click, add with a box, undo, reload, and
    kill the server mid-queue and start it again; a screenshot of the page."""
    playwright = pytest.importorskip("playwright.sync_api")
    _, records = dataset
    out = tmp_path / "reviews"
    server = _serve(model, records, out)
    shots = tmp_path / "shots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        try:
            ready = "window.samtune && window.samtune.ready"
            page.goto(server.url.replace("?token=", "?token=wrong"))
            assert "token" in page.content()  # refused without the token
            page.goto(server.url)
            page.wait_for_function(ready, timeout=30000)
            assert page.inner_text("#progress") == "0 / 3 reviewed"

            def statuses():
                return page.evaluate("window.samtune.state.objects.map(o => o.status)")

            def do(key):
                page.evaluate("window.samtune.lastAction = null")
                page.keyboard.press(key)
                page.wait_for_function("window.samtune.lastAction && window.samtune.lastAction.action", timeout=30000)

            page.keyboard.press("Tab")  # selects object 1
            do("a")
            assert statuses()[0] == "accepted"
            page.keyboard.press("Tab")
            do("r")
            assert statuses()[1] == "rejected"
            # fix object 3 with a negative click: the mask on screen changes
            page.keyboard.press("Tab")
            before = page.evaluate("JSON.stringify(window.samtune.state.objects[2].runs)")
            centre = page.evaluate("""(() => { const S = window.samtune, o = S.state.objects[2], w = S.state.size[1];
                let pos = 0, on = false, xs = 0, ys = 0, n = 0;
                for (const r of o.runs) { if (on) for (let p = pos; p < pos + r; p++) { xs += p % w; ys += Math.floor(p / w); n++; }
                  pos += r; on = !on; }
                return [xs / n, ys / n]; })()""")
            box = page.locator("#canvas").bounding_box()
            scale, ox, oy = page.evaluate("[window.samtune.scale, window.samtune.ox, window.samtune.oy]")
            page.evaluate("window.samtune.lastAction = null")
            page.mouse.click(box["x"] + ox + (centre[0] + 3.5) * scale, box["y"] + oy + (centre[1] + 0.5) * scale,
                             button="right")
            page.wait_for_function("window.samtune.lastAction && window.samtune.lastAction.action === 'click'",
                                   timeout=30000)
            assert statuses()[2] == "fixed"
            assert page.evaluate("JSON.stringify(window.samtune.state.objects[2].runs)") != before
            # add an object with a box, then undo it
            page.keyboard.press("Escape")
            page.keyboard.press("b")
            page.evaluate("window.samtune.lastAction = null")
            x0, y0 = box["x"] + ox + 150 * scale, box["y"] + oy + 150 * scale
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + 25 * scale, y0 + 25 * scale, steps=4)
            page.mouse.up()
            page.wait_for_function("window.samtune.lastAction && window.samtune.lastAction.action === 'box'",
                                   timeout=30000)
            assert statuses()[-1] == "added" and len(statuses()) == 9
            page.keyboard.press("Escape")
            page.screenshot(path=str(shots / "annotator.png"))
            do("z")
            assert len(statuses()) == 8
            # reload: the same state
            shown = statuses()
            page.reload()
            page.wait_for_function(ready, timeout=30000)
            assert statuses() == shown
            do("n")  # done: the next image, progress counts it
            page.wait_for_function("window.samtune.index === 1 && window.samtune.state", timeout=30000)
            assert page.inner_text("#progress") == "1 / 3 reviewed"
        finally:
            server.shutdown()
            server.server_close()
        # killed mid-queue and started again: nothing lost, the queue goes on at image 2
        server = _serve(model, records, out)
        try:
            page.goto(server.url)
            page.wait_for_function(ready, timeout=30000)
            assert page.inner_text("#progress") == "1 / 3 reviewed"
            assert page.evaluate("window.samtune.index") == 1
            page.goto(server.url)
            page.wait_for_function(ready, timeout=30000)
            page.keyboard.press("p")
            page.wait_for_function("window.samtune.index === 0 && window.samtune.state", timeout=30000)
            assert statuses() == shown
        finally:
            server.shutdown()
            server.server_close()
            browser.close()
    assert (shots / "annotator.png").stat().st_size > 10_000
