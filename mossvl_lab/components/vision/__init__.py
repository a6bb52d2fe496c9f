"""Vision towers; importing a tower's module registers it in mossvl_lab.registry under slot "vision"."""

from .mllama_vit import MllamaVisionTower, VisionInputError
from .moss_vit import MossVisionTower
from .pooling import pool_patch_grid
from .toy_conv import ToyConvTower

__all__ = ["MllamaVisionTower", "MossVisionTower", "ToyConvTower", "VisionInputError", "pool_patch_grid"]
