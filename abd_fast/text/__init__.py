"""Caption text utilities: EDA augmentation (abd_fast.text.eda)."""
from .eda import EDA

__all__ = ["EDA"]
