"""Inference on new images (``scripts/predict.py``): prompted or automatic masks, written as PNG, COCO and overlays."""
