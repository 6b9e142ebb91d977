"""Method adapters. Importing this package registers every method in ``harness.registry.METHODS``.

Each module is imported explicitly: the list below is the set of method names.
No module here imports torch at import time.
"""
from . import folder, identity, inpaint, move, paste, recolor  # noqa: F401
from . import instruct_pix2pix  # noqa: F401
from . import magicbrush  # noqa: F401
from . import sdedit  # noqa: F401
from . import diffedit  # noqa: F401
from . import sd_inpaint  # noqa: F401
from . import diffusers_pipeline  # noqa: F401
