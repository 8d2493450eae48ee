"""The evaluation part of a run, shared by ``train.py`` and ``scripts/evaluate.py``.

An :class:`EvalJob` holds the evaluation sets (the configured split, plus ``eval.extra_sets`` for the forgetting
check) with their fixed prompts, evaluates each model it is given on all of them (caching each result under
``eval/`` so a resumed run does not redo it), and writes the report.
"""

from __future__ import annotations

import logging
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from samtune.data.records import ImageRecord, load_record
from samtune.data.resolve import dataset_root, scan_split
from samtune.data.volumes import read_manifest, volume_dice
from samtune.evaluation.evaluator import PROMPT_MODES, EvalResult, evaluate_model
from samtune.evaluation.overlays import overlay_name, plot_clicks, save_overlays
from samtune.evaluation.report import ExtraSetResult, worst_images, write_report
from samtune.model.checkpoint import weights_fingerprint
from samtune.model.promptable_sam import PromptableSam
from samtune.predict.zoom import zoom_config
from samtune.prompts import load_prompts, make_instance_prompts, save_prompts
from samtune.utils.device import eval_device
from samtune.utils.io import atomic_write_json, read_json
from samtune.utils.progress import progress

log = logging.getLogger(__name__)

MAIN = "main"


@dataclass
class EvalSet:
    """One dataset split to evaluate on.

    Attributes:
        name: ``main`` (``eval.split`` of ``data``) or the ``eval.extra_sets`` entry's name.
        root: Dataset root.
        split: Split folder.
        records: Its images.
        skipped: Files skipped with ``skip_invalid`` (``{"file", "reason"}``).
        binary_as_one_object: Mask interpretation.
        modes: Modes evaluated on it.
        prompts_file: User-given fixed prompts (None: generate into the run directory).
    """

    name: str
    root: Path
    split: str
    records: list[ImageRecord]
    skipped: list[dict]
    binary_as_one_object: bool
    modes: list[str]
    prompts_file: Path | None = None


def fixed_prompts(eval_set: EvalSet, default_path: Path, seed: int) -> tuple[dict, Path]:
    """Prompts shared by every evaluated model: from the set's prompts file, ``default_path``, or new."""
    if eval_set.prompts_file is not None:
        prompts = load_prompts(eval_set.prompts_file)
        missing = [r.rel_path for r in eval_set.records if r.rel_path not in prompts]
        if missing:
            raise ValueError(f"prompts file {eval_set.prompts_file} has no prompts for {len(missing)} images of "
                             f"{eval_set.root}/{eval_set.split}, e.g. {missing[:3]}")
        return prompts, eval_set.prompts_file
    if default_path.exists():
        return load_prompts(default_path), default_path
    prompts = {}
    for r in progress(eval_set.records, desc=f"prompts {eval_set.name}"):
        _, instances = load_record(r, binary_as_one_object=eval_set.binary_as_one_object)
        prompts[r.rel_path] = make_instance_prompts(instances, seed=seed, key=r.rel_path)
    save_prompts(default_path, prompts, seed=seed)
    return prompts, default_path


def validation_prompts(records: list[ImageRecord], *, seed: int, binary_as_one_object: bool,
                       max_per_image: int) -> dict[str, list[dict]]:
    """Fixed evaluation prompts for the val split (zoomed validation): at most ``max_per_image`` instances per
    image, drawn at random (seeded by ``seed`` and the image's path) so that they stand for all of its instances
    (the first ones by id are the objects a generator drew first: on the generated boards, component bodies)."""
    prompts = {}
    for r in records:
        _, instances = load_record(r, binary_as_one_object=binary_as_one_object)
        every = make_instance_prompts(instances, seed=seed, key=r.rel_path)
        if len(every) > max_per_image:
            rng = np.random.default_rng(zlib.crc32(f"val:{seed}:{r.rel_path}".encode()))
            every = [every[i] for i in sorted(rng.choice(len(every), max_per_image, replace=False))]
        prompts[r.rel_path] = every
    return prompts


class EvalJob:
    """Evaluate models on the main split and the extra sets with fixed prompts, then write the report.

    Args:
        cfg: The run's config (``eval``, ``model``, ``task_name``).
        run_dir: The run directory (prompts, caches, report).
        sets: The main set first, then the extra sets.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, sets: list[EvalSet]) -> None:
        self.cfg, self.run_dir, self.sets = cfg, run_dir, sets
        self.ev = cfg.eval
        self.zoom = zoom_config(self.ev)
        self.device = eval_device(self.ev)
        seed = int(self.ev.prompt_seed)
        self.prompts: dict[str, tuple[dict, Path]] = {}
        for s in sets:
            default = run_dir / ("prompts.json" if s.name == MAIN else f"prompts_{s.name}.json")
            self.prompts[s.name] = fixed_prompts(s, default, seed)
        self.results: dict[str, dict[str, EvalResult]] = {s.name: {} for s in sets}
        # volumes sliced by samtune: 3-D Dice per volume of the stacked slice predictions (model -> figures)
        self.manifest = read_manifest(sets[0].root)
        self.volumes: dict[str, dict] = {}
        self.engine: dict | None = None  # the data engine's rounds, when it ran
        self._evaluated: dict[tuple[str, str], str] = {}  # (set, weights fingerprint) -> name evaluated with them
        main_modes = sets[0].modes
        self.map_mode = next((m for m in PROMPT_MODES if m in main_modes), None)

    def set_engine(self, engine: dict, *, final: str, prefix: str = "round_") -> None:
        """Report a data engine: its rounds (``engine``, see :func:`samtune.evaluation.report.engine_json`) and
        the evaluation of its ``final`` round as ``finetuned``; the other rounds' evaluations (named ``prefix*``)
        are in the rounds' table, not the model columns."""
        for results in self.results.values():
            if final in results:
                results["finetuned"] = results.pop(final)
            for name in [n for n in results if n.startswith(prefix)]:
                results.pop(name)
        if final in self.volumes:
            self.volumes["finetuned"] = self.volumes.pop(final)
        self.volumes = {n: v for n, v in self.volumes.items() if not n.startswith(prefix)}
        self.engine = engine

    @property
    def main(self) -> EvalSet:
        return self.sets[0]

    def _settings(self, s: EvalSet) -> dict:
        auto = OmegaConf.to_container(self.ev.get("auto") or {}, resolve=True) if "auto" in s.modes else None
        return {"modes": s.modes, "max_clicks": int(self.ev.max_clicks), "auto": auto,
                "zoom": self.zoom.describe() if self.zoom else None, "save_masks": bool(self.ev.save_masks)}

    def map_dir(self, name: str) -> Path:
        return self.run_dir / "eval" / "maps" / name

    def evaluate(self, model: PromptableSam, name: str) -> dict[str, EvalResult]:
        """Evaluate ``model`` as ``name`` (``zero_shot`` / ``finetuned``) on every set; return set -> result."""
        model.to(self.device)
        # a stored evaluation is reused only for the same weights: a resumed run that trains further (a larger
        # trainer.max_steps) or another checkpoint under the same name is evaluated again
        weights = weights_fingerprint(model)
        for s in self.sets:
            cache = self.run_dir / "eval" / (f"{name}.json" if s.name == MAIN else f"extra/{s.name}/{name}.json")
            settings = {**self._settings(s), "weights": weights}
            same = self._evaluated.get((s.name, weights))
            if not (cache.exists() and read_json(cache).get("settings") == settings) and same is not None:
                # the same weights were evaluated under another name (a data-engine round that kept its start):
                # the figures are those, the prompts being fixed
                source = self.run_dir / "eval" / (f"{same}.json" if s.name == MAIN else f"extra/{s.name}/{same}.json")
                atomic_write_json(cache, read_json(source))
                if s.name == MAIN and self.map_dir(same).is_dir() and not self.map_dir(name).exists():
                    shutil.copytree(self.map_dir(same), self.map_dir(name))
                log.info("%s has the weights of %s: its evaluation on %s is that one", name, same, s.name)
            if cache.exists() and read_json(cache).get("settings") == settings:
                data = read_json(cache)
                log.info("Reusing the %s evaluation on %s from %s", name, s.name, cache)
                self.results[s.name][name] = EvalResult(data["summary"], data["rows"], data.get("calibration", {}))
                self._evaluated.setdefault((s.name, weights), name)
                continue
            is_main = s.name == MAIN
            result = evaluate_model(
                model, s.records, self.prompts[s.name][0], name=name, modes=s.modes,
                binary_as_one_object=s.binary_as_one_object, save_masks=settings["save_masks"], zoom=self.zoom,
                max_clicks=settings["max_clicks"], auto_params=settings["auto"],
                map_dir=self.map_dir(name) if is_main and self.map_mode else None, map_mode=self.map_mode or "box",
            )
            atomic_write_json(cache, {"settings": settings, "summary": result.summary, "rows": result.rows,
                                      "calibration": result.calibration})
            self.results[s.name][name] = result
            self._evaluated.setdefault((s.name, weights), name)
            log.info("%s on %s: %s", name, s.name, {m: round(v["miou"], 4) for m, v in result.summary.items()})
        if self.manifest is not None and self.map_mode:
            self.volumes[name] = volume_dice(self.manifest, self.main.split, self.map_dir(name))
            if self.volumes[name]:
                log.info("%s: 3-D Dice over %d volumes (%s prompts per slice): %.4f", name,
                         self.volumes[name]["n_volumes"], self.map_mode, self.volumes[name]["dice3d"] or 0.0)
        return {s: r[name] for s, r in self.results.items()}

    def _pictures(self) -> tuple[list[Path], list[dict], Path | None]:
        main, results = self.main, self.results[MAIN]
        if self.map_mode is None or not results:
            overlays, worst = [], []
        else:
            map_dirs = {n: self.map_dir(n) for n in results}
            worst = worst_images(results, self.map_mode, int(self.ev.get("worst", 4)))
            by_path = {r.rel_path: r for r in main.records}
            captions = {w["image"]: {n: f", mIoU {w[n]:.2f}" for n in results if w.get(n) is not None} for w in worst}
            out = self.run_dir / "overlays"
            save_overlays(out / "worst", [by_path[w["image"]] for w in worst], map_dirs, mode=self.map_mode,
                          binary_as_one_object=main.binary_as_one_object, captions=captions)
            for w in worst:
                path = out / "worst" / overlay_name(w["image"])
                w["overlay"] = path if path.is_file() else None
            overlays = save_overlays(out, main.records[: int(self.ev.overlays)], map_dirs, mode=self.map_mode,
                                     binary_as_one_object=main.binary_as_one_object)
        curves = {n: r.summary["clicks"]["miou_at"] for n, r in results.items() if "clicks" in r.summary}
        plot = plot_clicks(self.run_dir / "clicks.png", curves) if curves else None
        return overlays, worst, plot

    def write_report(self, meta: dict | None = None) -> dict:
        """Write report.json / instances.jsonl / report.md; return the report."""
        main = self.main
        overlays, worst, plot = self._pictures()
        extra = {
            s.name: ExtraSetResult(
                meta={"root": str(s.root), "split": s.split, "n_images": len(s.records), "modes": s.modes,
                      "prompts_file": str(self.prompts[s.name][1])},
                results=self.results[s.name], skipped_files=s.skipped,
            )
            for s in self.sets[1:]
        }
        cfg = self.cfg
        full_meta = {
            "experiment": cfg.get("task_name"), "data_root": str(main.root), "split": main.split,
            "n_images": len(main.records), "model_type": cfg.model.type,
            "checkpoint": OmegaConf.select(cfg, "model.checkpoint", default=None, throw_on_missing=False),
            "prompts_file": str(self.prompts[MAIN][1]), "prompt_seed": int(self.ev.prompt_seed),
            "eval_note": self.zoom.describe() if self.zoom else "whole image, SamPredictor preprocessing",
            "run_dir": str(self.run_dir), **(meta or {}),
        }
        return write_report(
            self.run_dir, self.results[MAIN], skipped_files=main.skipped, meta=full_meta, overlays=overlays,
            extra_sets=extra, worst=worst, worst_mode=self.map_mode or "box", clicks_plot=plot,
            volumes={"mode": self.map_mode, **self.volumes} if any(self.volumes.values()) else None,
            engine=self.engine,
        )


def report_metrics(report: dict) -> dict[str, float]:
    """Flat test figures of a report: ``test/<model>/<mode>_miou``, NoC, auto precision/recall, extra sets."""
    out: dict[str, float] = {}

    def add(prefix: str, summaries: dict) -> None:
        for name in ("zero_shot", "finetuned"):
            for mode, v in (summaries.get(name) or {}).items():
                out[f"{prefix}/{name}/{mode}_miou"] = v["miou"]
                for key in ("noc85", "noc90", "precision50", "recall50"):
                    if key in v:
                        out[f"{prefix}/{name}/{mode}_{key}"] = v[key]

    add("test", report)
    for name, v in (report.get("volumes") or {}).items():
        if isinstance(v, dict) and v.get("dice3d") is not None:
            out[f"test/{name}/dice3d"] = v["dice3d"]
    for set_name, ex in (report.get("extra_sets") or {}).items():
        add(f"extra/{set_name}", ex)
    return {k: (float("nan") if v is None else float(v)) for k, v in out.items()}


EXTRA_SET_DEFAULTS = {
    "name": None, "source": "folder", "root": None, "split": "test", "generator": None, "generator_params": {},
    "binary_as_one_object": False, "skip_invalid": False, "modes": None, "prompts_file": None, "volume": None,
}


def eval_sets(cfg: DictConfig, root: Path, records: dict, skipped: list[dict]) -> list[EvalSet]:
    """The evaluation split of ``data`` (first), then each ``eval.extra_sets`` entry (the forgetting check)."""
    ev = cfg.eval
    prompts_file = Path(hydra.utils.to_absolute_path(str(ev.prompts_file))) if ev.get("prompts_file") else None
    sets = [EvalSet(MAIN, root, str(ev.split), records["eval"], skipped, bool(cfg.data.binary_as_one_object),
                    list(ev.modes), prompts_file)]
    for i, spec in enumerate(ev.get("extra_sets") or []):
        where = f"eval.extra_sets[{i}]"
        if not isinstance(spec, DictConfig):
            raise ValueError(f"{where} must be a mapping like {{name: scenes, source: folder, root: DIR, split: test}}")
        unknown = sorted(set(spec) - set(EXTRA_SET_DEFAULTS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; valid: {sorted(EXTRA_SET_DEFAULTS)}")
        d = OmegaConf.merge(EXTRA_SET_DEFAULTS, spec)
        name = str(d.name or "")
        if not name.replace("_", "").replace("-", "").isalnum() or name == MAIN or name in {s.name for s in sets}:
            raise ValueError(f"{where}.name={d.name!r}: give each extra set a unique name of letters, digits, - or _")
        set_root = dataset_root(d, where)
        recs, bad = scan_split(d, set_root, str(d.split))
        pf = Path(hydra.utils.to_absolute_path(str(d.prompts_file))) if d.prompts_file else None
        sets.append(EvalSet(name, set_root, str(d.split), recs, bad, bool(d.binary_as_one_object),
                            list(d.modes) if d.modes else list(ev.modes), pf))
    return sets
