"""Latency of the annotator in a real browser: click -> mask drawn, and the next image's appearance.

``python scripts/annotator_benchmark.py [--images 3] [--clicks 8] [overrides of configs/annotate.yaml ...]``

Starts the annotator (default: the generated PCB boards' test split, the shipped ``sam_tiny``, prompt-focused zoom)
on a temporary reviews folder, drives Debian's Chromium through Playwright (``--chromium /usr/bin/chromium``), and on
each image selects objects and clicks inside them (each click re-segments the object with all its clicks: SAM's
interactive loop). The page measures each action from the click to the mask drawn (request, model, answer and
drawing) and each image from asking for it to drawn; then, with nothing selected, it adds a few objects by one click
on uncovered ground (no warm-up possible there). Prints one JSON line: medians and 95th percentiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="images to go through")
    parser.add_argument("--clicks", type=int, default=8, help="objects clicked per image")
    parser.add_argument("--per-object", type=int, default=2, help="clicks on each object")
    parser.add_argument("--new-objects", type=int, default=3, help="new objects added by a click per image")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="configs/annotate.yaml overrides, e.g. zoom=null model=vit_b")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from playwright.sync_api import sync_playwright

    from samtune.annotate.app import annotation_server

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("annotate", overrides=[f"out={out}", "split=test", *args.overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        server = annotation_server(cfg)
        server.start_background()
        clicks, opens, news = [], [], []
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1280, "height": 820})
                page.goto(server.url)
                page.wait_for_function("window.samtune && window.samtune.ready", timeout=120000)
                for k in range(args.images):
                    if k:
                        page.evaluate("window.samtune.lastAction = null")
                        page.keyboard.press("n")
                        page.wait_for_function(f"window.samtune.index === {k} && window.samtune.state "
                                               "&& window.samtune.drawnAt > window.samtune.shownAt - 1",
                                               timeout=120000)
                        opens.append(page.evaluate("window.samtune.openMs"))
                    n = min(args.clicks, page.evaluate("window.samtune.state.objects.length"))
                    for j in range(n):
                        page.keyboard.press("Escape")
                        point = page.evaluate(f"""(() => {{ const S = window.samtune, o = S.state.objects[{j}],
                            w = S.state.size[1]; let pos = 0, on = false, best = null;
                            for (const r of o.runs) {{ if (on && best === null) best = pos + Math.floor(r / 2);
                              pos += r; on = !on; }}
                            return [best % w, Math.floor(best / w), S.scale, S.ox, S.oy]; }})()""")
                        # select it as the page does (the server decodes its first click meanwhile), then click
                        # after a human's pause: 0.3 s
                        page.evaluate(f"(() => {{ const S = window.samtune; S.select(S.state.objects[{j}].id); }})()")
                        page.wait_for_timeout(300)
                        box = page.locator("#canvas").bounding_box()
                        x, y, scale, ox, oy = point
                        for c in range(args.per_object):  # a first correction click, then further ones beside it
                            page.evaluate("window.samtune.lastAction = null")
                            page.mouse.click(box["x"] + ox + (x + c + 0.5) * scale, box["y"] + oy + (y + 0.5) * scale)
                            page.wait_for_function("window.samtune.lastAction", timeout=120000)
                            clicks.append(page.evaluate("window.samtune.lastAction.ms"))
                            page.wait_for_timeout(200)
                    # new objects: with nothing selected, a click on ground no object covers (a crop embedded, and
                    # on the whole image an answer the crop cuts, with no warm-up possible)
                    for j in range(args.new_objects):
                        page.keyboard.press("Escape")
                        spot = page.evaluate(f"""(() => {{ const S = window.samtune, [h, w] = S.state.size;
                            const covered = new Uint8Array(w * h);
                            for (const o of S.state.objects) {{ let pos = 0, on = false;
                              for (const r of o.runs) {{ if (on) covered.fill(1, pos, pos + r); pos += r; on = !on; }} }}
                            for (let t = 0; t < 5000; t++) {{ const p = (({j} + 1) * 7919 * (t + 1)) % (w * h);
                              if (!covered[p]) return [p % w, Math.floor(p / w), S.scale, S.ox, S.oy]; }}
                            return null; }})()""")
                        if spot is None:
                            break
                        box = page.locator("#canvas").bounding_box()
                        x, y, scale, ox, oy = spot
                        page.evaluate("window.samtune.lastAction = null")
                        page.mouse.click(box["x"] + ox + (x + 0.5) * scale, box["y"] + oy + (y + 0.5) * scale)
                        page.wait_for_function("window.samtune.lastAction", timeout=120000)
                        news.append(page.evaluate("window.samtune.lastAction.ms"))
                browser.close()
        finally:
            server.shutdown()
            server.server_close()
    print(json.dumps({
        "model": str(cfg.model.type), "zoom": cfg.zoom.get("context") if cfg.zoom else None,
        "threads": torch.get_num_threads(), "clicks": len(clicks),
        "click_to_mask_ms_median": round(statistics.median(clicks), 1),
        "click_to_mask_ms_p95": round(_percentile(clicks, 0.95), 1),
        "new_object_clicks": len(news),
        "new_object_ms_median": round(statistics.median(news), 1) if news else None,
        "new_object_ms_p95": round(_percentile(news, 0.95), 1) if news else None,
        "next_image_ms_median": round(statistics.median(opens), 1) if opens else None,
        "next_image_ms_max": round(max(opens), 1) if opens else None,
    }), flush=True)


if __name__ == "__main__":
    main()
