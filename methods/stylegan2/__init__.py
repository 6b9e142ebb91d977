"""A StyleGAN2 generator in plain PyTorch (no custom CUDA ops), its checkpoint loaders and GAN
inversion, shared by the GAN baselines of the DiffEditor tables (:mod:`methods.draggan`,
:mod:`methods.usercontrollablelt`; issue 16).

- :mod:`.generator`: mapping network, modulated convolutions with demodulation, per-layer noise,
  skip-architecture toRGB, FIR up-sampling (``upfirdn2d``) written with ``torch.nn.functional``;
  parameter and buffer names follow NVIDIA's ``stylegan2-ada-pytorch`` ``training/networks.py``,
  so a ``G_ema`` state dict loads as is; ``.pkl`` snapshots through a restricted unpickler that
  never runs the code stored in them; a ``tiny`` random-weight configuration for tests.
- :mod:`.inversion`: the projector (optimise ``w`` or ``w+`` under LPIPS VGG and a pixel loss),
  with the stylegan2-ada-pytorch ``projector.py`` schedule.

No torch import at package import time (``methods`` is imported by the registry).
"""
