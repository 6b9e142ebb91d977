"""DragDiffusion's first stage: LoRA fine-tuning of the UNet on the source image.

As the official ``utils/lora_utils.py`` ``train_lora`` (``Yujun-Shi/DragDiffusion``): rank-``r``
LoRA on every attention projection of the UNet (``to_q``, ``to_k``, ``to_v``, ``to_out[0]``),
scale 1 (the diffusers ``LoRALinearLayer`` default: ``network_alpha`` unset), down matrix
Gaussian with std ``1 / r`` and up matrix zero; AdamW (betas 0.9 / 0.999, weight decay 1e-2,
eps 1e-8, constant learning rate); each step a batch of ``batch_size`` copies of the source
(``Resize(512)`` + ``RandomCrop(512)``: the identity on the harness's square working size), each
VAE-encoded by a *sample* of the posterior, noised at a timestep uniform over the training
schedule (``DDPMScheduler.add_noise``), epsilon-prediction MSE.

The adapter is attached with the library: diffusers' ``unet.add_adapter(peft.LoraConfig(...))``
(``init_lora_weights="gaussian"`` is exactly that initialisation, ``lora_alpha = r`` scale 1), and
removed with ``unet.unload_lora()`` when the edit ends (the loaded UNet is shared by every method
of the process). The training loop is the few lines above, written here.

Differences from the official loop, both for cost, neither changes the distribution trained on:
the source is VAE-encoded once and each step draws its posterior samples from that one encoding
(the encoder is deterministic; the official code re-encodes the same image every step); the
random draws come from the edit's seeded generator, and the adapter's initialisation from a global
state seeded with that generator's seed (the official code seeds torch globally).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Iterator

from ..diffusion import counting

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_NAME = "dragdiffusion_lora"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # lora_utils.train_lora: every attention projection
TRAIN_COUNT_NAME = "unet_lora_train"  # fine-tuning forward passes, counted apart from the edit's UNet calls


class MissingPeft(RuntimeError):
    """peft is not installed: DragDiffusion's LoRA stage cannot run."""


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - peft is a dependency of the project
        raise MissingPeft("DragDiffusion's LoRA fine-tuning needs the 'peft' package (pip install peft); "
                          "or set lora_steps=0 to skip the LoRA stage") from e


def lora_config(rank: int) -> Any:
    """The official LoRA: rank ``rank``, scale 1, Gaussian down / zero up initialisation."""
    require_peft()
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian",
                      target_modules=list(TARGET_MODULES))


@contextlib.contextmanager
def attached_lora(unet: Any, rank: int, seed: int | None = None) -> Iterator[list["torch.Tensor"]]:
    """Attach a fresh LoRA adapter to ``unet`` for the duration of the block; yields its trainable
    parameters. On exit the adapter layers are removed (``unload_lora``) and every base weight's
    ``requires_grad`` and the train / eval mode are put back: the UNet is as it was.

    peft draws the Gaussian down matrices from torch's global generator; with ``seed`` they are
    drawn from a global state seeded with it (forked: the caller's global state is untouched), so
    an edit's LoRA starts the same every time (the official code seeds torch globally)."""
    import torch

    grads = {n: p.requires_grad for n, p in unet.named_parameters()}
    training = unet.training
    unet.requires_grad_(False)
    if seed is None:
        unet.add_adapter(lora_config(rank), adapter_name=ADAPTER_NAME)
    else:
        dev = next(unet.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(seed))
            unet.add_adapter(lora_config(rank), adapter_name=ADAPTER_NAME)
    try:
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            # LoRA weights train in float32 whatever the UNet's dtype (peft casts the layer input
            # to the adapter's dtype and the result back)
            p.data = p.data.float()
            p.requires_grad_(True)
        yield params
    finally:
        unet.unload_lora()
        for n, p in unet.named_parameters():
            p.requires_grad_(grads.get(n, False))
        unet.train(training)


@contextlib.contextmanager
def counted_as(name: str, network: str = "unet") -> Iterator[None]:
    """Move the forward calls and rows of ``network`` made inside the block to ``name`` in this
    edit's tally (:mod:`methods.diffusion.counting`): fine-tuning passes reported apart."""
    tally = counting.current()
    if tally is None:
        yield
        return
    calls, rows = tally.calls[network], tally.rows[network]
    try:
        yield
    finally:
        dc, dr = tally.calls[network] - calls, tally.rows[network] - rows
        tally.calls[network] -= dc
        tally.rows[network] -= dr
        if not tally.calls[network]:
            del tally.calls[network], tally.rows[network]
        if dc:
            tally.calls[name] += dc
            tally.rows[name] += dr


@dataclasses.dataclass
class LoraStage:
    steps: int
    losses: list[float]
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def train_lora(unet: Any, params: list["torch.Tensor"], scheduler_config: Any, posterior: Any,
               text: "torch.Tensor", steps: int, lr: float, batch_size: int, generator: Any,
               scaling_factor: float) -> LoraStage:
    """``steps`` AdamW steps of the attached LoRA ``params`` on the epsilon-prediction loss of the
    source (``posterior``: the source's VAE ``latent_dist``; ``text``: ``[1, L, D]`` prompt
    embedding). Forward passes are counted as :data:`TRAIN_COUNT_NAME`."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    t0 = time.perf_counter()
    losses: list[float] = []
    if steps <= 0:
        return LoraStage(0, losses, 0.0)
    noise_sched = DDPMScheduler.from_config(dict(getattr(scheduler_config, "config", scheduler_config)))
    if noise_sched.config.prediction_type != "epsilon":
        raise ValueError(f"dragdiffusion: only epsilon-prediction models are supported, the scheduler says "
                         f"{noise_sched.config.prediction_type!r}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = get_scheduler("constant", optimizer=opt, num_warmup_steps=0, num_training_steps=steps)
    mean, std = posterior.mean.detach(), posterior.std.detach()
    dev = mean.device
    emb = text.detach().expand(batch_size, *text.shape[1:])
    unet.train()
    with counted_as(TRAIN_COUNT_NAME):
        for _ in range(steps):
            eps_post = torch.randn((batch_size, *mean.shape[1:]), generator=generator, device=generator.device)
            x0 = (mean + std * eps_post.to(dev, mean.dtype)) * scaling_factor
            noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev, x0.dtype)
            ts = torch.randint(0, int(noise_sched.config.num_train_timesteps), (batch_size,),
                               generator=generator, device=generator.device).to(dev).long()
            noisy = noise_sched.add_noise(x0, noise, ts)
            pred = unet(noisy, ts, encoder_hidden_states=emb).sample
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    unet.eval()
    return LoraStage(steps, losses, time.perf_counter() - t0)
