"""DragonDiffusion (Mou et al., ICLR 2024) and DiffEditor (Mou et al., CVPR 2024): the shared code.

Official code (read, not copied): ``MC-E/DragonDiffusion`` (both methods; ``src/models/Sampler.py``,
``src/models/dragondiff.py``, ``src/unet/*``, ``src/utils/inversion.py``, ``src/demo/model.py``).
Paper: ``shared/papers/diffeditor.md``; facts from the code: ``shared/SEED_METHODS.md`` section 4.

One file per stage:

- ``tasks.py``       the edit task from sample fields (drag, face, move, paste, appearance), masks
- ``estimator.py``   the feature estimator (a second SD UNet; decoder features for the energies)
- ``energy.py``      the edit / content / contrast / inpainting energies and their gradients
- ``inversion.py``   DDIM inversion of the source (and the reference) keeping every step's latent
                     and the memory bank (decoder self-attention keys and values per step)
- ``attention.py``   the memory-bank controller (on the shared EditingAttnProcessor seam) and the
                     decoupled image-prompt cross-attention (diffusers' IPAdapterAttnProcessor2_0)
- ``image_prompt.py`` DiffEditor's image-prompt encoder (OpenCLIP ViT-H/14 + resampler) loading
- ``sampler.py``     the step loop: CFG, energy-guidance schedule, regional SDE, time travel
- ``method.py``      the harness adapter base shared by ``methods/dragondiffusion.py`` and
                     ``methods/diffeditor.py``

Importing this package imports no torch and registers nothing (the two method modules register).
"""
from __future__ import annotations
