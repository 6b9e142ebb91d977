"""DragDiffusion (Shi et al., CVPR 2024): LoRA on the source (:mod:`.lora`), motion supervision and
point tracking on the inverted latent (:mod:`.drag`), the adapter (:mod:`.method`)."""
from __future__ import annotations

from .method import DragDiffusion

__all__ = ["DragDiffusion"]
