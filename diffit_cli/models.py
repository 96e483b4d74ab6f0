"""Public network classes (DESIGN §4): latent DiffiT (release layout, SPEC §5) and image-space DiffiT (SPEC §4)."""

from diffit_cli.core.unet import ImageDiffiT
from diffit_cli.core.vit import LATENT_SIZES, LatentDiffiT

__all__ = ["ImageDiffiT", "LatentDiffiT", "LATENT_SIZES"]
