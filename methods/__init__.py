"""Method adapters. Importing this package registers every method in ``harness.registry.METHODS``.

Each module is imported explicitly: the list below is the set of the harness's own method names
(``harness.registry.METHODS`` imports this package on its first lookup). Outside packages add
methods without editing this list, through the entry point group ``edit_harness.methods``
(:mod:`harness.plugins`). No module here imports torch at import time.
"""
from . import folder, identity, inpaint, move, paste, recolor  # noqa: F401
from . import instruct_pix2pix  # noqa: F401
from . import magicbrush  # noqa: F401
from . import sdedit  # noqa: F401
from . import diffedit  # noqa: F401
from . import sd_inpaint  # noqa: F401
from . import diffusers_pipeline  # noqa: F401
from . import pix2pix_zero  # noqa: F401
from . import blended_latent_diffusion  # noqa: F401
from . import masactrl  # noqa: F401
from . import plug_and_play  # noqa: F401
from . import ledits_pp  # noqa: F401
from . import prompt_to_prompt  # noqa: F401
from . import sdxl_inpaint  # noqa: F401
from . import paint_by_example  # noqa: F401
from . import zone  # noqa: F401  (a package: methods/zone/)
from . import text2live  # noqa: F401  (a package: methods/text2live/)
from . import partedit  # noqa: F401  (a package: methods/partedit/)
from . import ef_ddpm  # noqa: F401
from . import pnp_inversion  # noqa: F401
from . import partedit_bench_results  # noqa: F401
from . import infedit  # noqa: F401
from . import fpe  # noqa: F401
from . import imagic  # noqa: F401
from . import tedbench_results  # noqa: F401
from . import cpam  # noqa: F401  (a package: methods/cpam/)
from . import dragdiffusion  # noqa: F401  (a package: methods/dragdiffusion/)
from . import self_guidance  # noqa: F401
from . import diffeditor, dragondiffusion  # noqa: F401  (shared code: methods/dragon/)
from . import draggan, usercontrollablelt  # noqa: F401  (GAN baselines: methods/stylegan2/)
