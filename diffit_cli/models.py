"""Public network classes: latent DiffiT (release layout) and image-space DiffiT (docs/paper.md, 'Latent network'
and 'Image-space network')."""

from diffit_cli.core.unet import ImageDiffiT
from diffit_cli.core.vit import LATENT_SIZES, LatentDiffiT

__all__ = ["ImageDiffiT", "LatentDiffiT", "LATENT_SIZES"]
