"""Deformable DETR lesion detection and MedMask (feature MAE, expert distillation, teaching)."""

from medssl.detection.deformable_attn import MSDeformAttn, ms_deform_attn
from medssl.detection.detr import DeformableDETR, DetrConfig, build_detector, postprocess

__all__ = ["DeformableDETR", "DetrConfig", "MSDeformAttn", "build_detector", "ms_deform_attn", "postprocess"]
