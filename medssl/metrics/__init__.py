"""Metrics for classification, segmentation and detection (no file I/O, no training code)."""

from medssl.metrics.detection import coco_ap, froc

__all__ = ["coco_ap", "froc"]
