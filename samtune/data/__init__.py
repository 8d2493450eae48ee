"""Data layer: sources on disk -> records -> ``SamDataset`` items -> batches.

Follow one image: ``build_records`` (``sources``) finds and checks image/mask pairs and returns
``ImageRecord`` s; ``load_record`` (``records``) reads them as ``HxWx3 uint8`` RGB plus an
``HxW int32`` instance map (``io``); ``SamDataset`` (``dataset``) augments both jointly
(``build_augmentation``), applies SAM's resize / normalise / pad (``transforms``) and splits
the map into per-instance masks; ``collate_instances`` pads them into a batch.
"""

from samtune.data.dataset import SamDataset, collate_instances
from samtune.data.errors import DataError
from samtune.data.io import (
    IMAGE_EXTENSIONS,
    coco_instances,
    decode_coco_segmentation,
    load_image,
    load_instance_mask,
    relabel_consecutive,
)
from samtune.data.records import ImageRecord, load_record
from samtune.data.sources import build_records, scan_coco, scan_folder
from samtune.data.synthetic_medical import ensure_medical_dataset, generate_medical_dataset
from samtune.data.synthetic_pcb import ensure_pcb_dataset, generate_pcb_dataset
from samtune.data.transforms import (
    AUGMENT_PRESETS,
    PIXEL_MEAN,
    PIXEL_STD,
    build_augmentation,
    normalize_and_pad,
    resize_longest_side,
    resize_mask_longest_side,
)

__all__ = [
    "AUGMENT_PRESETS",
    "IMAGE_EXTENSIONS",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "DataError",
    "ImageRecord",
    "SamDataset",
    "build_augmentation",
    "build_records",
    "coco_instances",
    "collate_instances",
    "decode_coco_segmentation",
    "ensure_medical_dataset",
    "ensure_pcb_dataset",
    "generate_medical_dataset",
    "generate_pcb_dataset",
    "load_image",
    "load_instance_mask",
    "load_record",
    "normalize_and_pad",
    "relabel_consecutive",
    "resize_longest_side",
    "resize_mask_longest_side",
    "scan_coco",
    "scan_folder",
]
