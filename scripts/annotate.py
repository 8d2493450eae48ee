"""Review proposals, fix them with clicks and add objects in a local web page.

``python scripts/annotate.py data=folder data.root=DIR split=train ckpt=CKPT out=REVIEWS`` (Hydra,
configs/annotate.yaml). Prints the page's URL with its access token, as Jupyter does; every decision is saved in
``out`` as it is made (reviews/*.json, masks/*.png, coco.json). Stop it with Ctrl+C; starting it again continues
where it stopped.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../configs", config_name="annotate")
def main(cfg: DictConfig) -> None:
    from samtune.annotate.app import annotation_server

    server = annotation_server(cfg)
    queue = server.session.queue()
    print(f"samtune annotator: {queue['reviewed']} / {queue['total']} images reviewed; reviews in {cfg.out}", flush=True)
    print(f"Open {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
