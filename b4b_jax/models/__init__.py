"""Flax NNX encoders (torchvision ResNets, DINO ViTs), the functional boundary, encoder directories."""
from b4b_jax.models.encoder import (Encoder, build_model, default_preprocessing, load_encoder,
                                    read_manifest, save_encoder)
from b4b_jax.models.functional import (apply_model, flatten_state, merge_model, split_model,
                                       state_from_flat)
from b4b_jax.models.random_init import save_random_encoder
from b4b_jax.models.resnet import ResNet, create_resnet
from b4b_jax.models.vit import VisionTransformer, create_vit

__all__ = [
    "Encoder", "ResNet", "VisionTransformer", "apply_model", "build_model", "create_resnet",
    "create_vit", "default_preprocessing", "flatten_state", "load_encoder", "merge_model",
    "read_manifest", "save_encoder", "save_random_encoder", "split_model", "state_from_flat",
]
