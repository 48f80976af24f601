"""A tiny timm ViT for the head tests (built directly, no weights)."""

from timm.models.vision_transformer import VisionTransformer


def tiny_vit(img_size=32, patch_size=4, in_chans=1, depth=3, dim=24, class_token=True):
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim,
                             depth=depth, num_heads=2, num_classes=0, class_token=class_token,
                             global_pool="token" if class_token else "avg")
