"""``annotation_server(cfg)``: what ``python scripts/annotate.py`` starts."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from samtune.annotate.server import AnnotatorServer
from samtune.annotate.session import AnnotationSession
from samtune.annotate.store import ReviewStore
from samtune.data.records import ImageRecord
from samtune.data.resolve import dataset_root, scan_split
from samtune.engine.pseudo import checkpoint_hash
from samtune.inference.segment import list_images
from samtune.model.factory import build_model
from samtune.predict.zoom import zoom_config
from samtune.utils.device import eval_device
from samtune.utils.io import read_json

log = logging.getLogger(__name__)


def engine_run_proposals(run: Path) -> tuple[list[ImageRecord], Path, dict[str, list[dict]], int]:
    """The unlabelled images of a data-engine run and the pseudo-labels of its last round that made some: the
    records, their dataset root, rel_path -> annotations, and the round.

    Raises:
        ValueError: not an engine run, or no round with pseudo-labels yet.
    """
    split_file, config = run / "engine" / "split.json", run / "config_resolved.yaml"
    if not split_file.is_file() or not config.is_file():
        raise ValueError(f"engine_run={run}: not a data-engine run (it needs engine/split.json and "
                         "config_resolved.yaml; python train.py experiment=pcb_data_engine makes one)")
    files = sorted(run.glob("engine/round_*/pseudo_labels.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        raise ValueError(f"engine_run={run}: no round has pseudo-labels yet (engine/round_*/pseudo_labels.json)")
    run_cfg = OmegaConf.load(config)
    root = dataset_root(run_cfg.data)
    unlabeled = set(read_json(split_file)["unlabeled"])
    records, _ = scan_split(run_cfg.data, root, str(run_cfg.data.train_split))
    records = [r for r in records if r.rel_path in unlabeled]
    data = read_json(files[-1])
    names = {im["id"]: im["file_name"] for im in data["images"]}
    pseudo: dict[str, list[dict]] = {}
    for ann in data["annotations"]:
        pseudo.setdefault(names[ann["image_id"]], []).append(ann)
    return records, root, pseudo, int(files[-1].parent.name.split("_")[1])


def _records(cfg: DictConfig) -> tuple[list[ImageRecord], Path]:
    """The images to annotate and the folder they come from (never written)."""
    if cfg.get("input"):
        if cfg.proposals == "labels":
            raise ValueError("proposals=labels needs a labelled split (data=..., split=...); with input= use "
                             "proposals=auto or proposals=none")
        source = Path(hydra.utils.to_absolute_path(str(cfg.input)))
        found = list_images(source)
        return [ImageRecord(image_path=p, rel_path=key, split="input") for p, key in found], source
    root = dataset_root(cfg.data)
    records, skipped = scan_split(cfg.data, root, str(cfg.split))
    if skipped:
        log.warning("%d files of %s/%s skipped: %s", len(skipped), root, cfg.split, skipped[:3])
    return records, root / str(cfg.split)


def annotation_server(cfg: DictConfig) -> AnnotatorServer:
    """Build the session of ``cfg`` and its server (not yet serving)."""
    if cfg.get("out") in (None, "", "???"):
        raise ValueError("out= is required: the folder where reviews are saved (see README: annotate and review)")
    out = Path(hydra.utils.to_absolute_path(str(cfg.out))).resolve()
    pseudo = None
    if cfg.get("engine_run"):
        run = Path(hydra.utils.to_absolute_path(str(cfg.engine_run)))
        records, source, pseudo, round_index = engine_run_proposals(run)
        log.info("Reviewing the pseudo-labels of round %d of %s on its %d unlabelled images", round_index, run,
                 len(records))
        OmegaConf.update(cfg, "proposals", "pseudo", force_add=True)
    else:
        records, source = _records(cfg)
    if out == source.resolve() or source.resolve() in out.parents:
        raise ValueError(f"out={out} is inside the images' folder {source}: reviews go to a folder of their own")
    ckpt = cfg.get("ckpt") or OmegaConf.select(cfg, "model.checkpoint", default=None)
    model = build_model(cfg.model.type, checkpoint=ckpt, arch=cfg.model.get("arch"), seed=int(cfg.seed))
    model.to(eval_device(cfg)).eval()
    store = ReviewStore(out)
    settings = {"ckpt": str(ckpt), "model_type": str(cfg.model.type), "images": str(source), "n_images": len(records),
                "proposals": str(cfg.proposals), "order": str(cfg.order)}
    store.record_settings(settings)
    zoom = zoom_config(cfg, where="")
    session = AnnotationSession(
        model, records, store, zoom=zoom, proposals=str(cfg.proposals),
        auto_params=OmegaConf.to_container(cfg.auto, resolve=True), order=str(cfg.order),
        model_sha256=checkpoint_hash(ckpt) if ckpt and Path(str(ckpt)).is_file() else "random-init",
        binary_as_one_object=bool(cfg.data.get("binary_as_one_object", False)), prefetch=int(cfg.prefetch),
        seed=int(cfg.seed), pseudo=pseudo)
    return AnnotatorServer(session, host=str(cfg.host), port=int(cfg.port))
