"""Text2LIVE's compositing and losses (official ``models/image_model.py`` ``render`` and
``util/losses.py`` ``LossG``), written here with torch.

Compositing: the generator's output [B, 4, H, W] is an edit layer (RGB ``C``, opacity ``a``);

- composite  ``I_o = a * C + (1 - a) * I``      (over the input ``I``),
- greenscreen ``I_s = a * C + (1 - a) * G``     (over a green screen ``G`` = (0, 177, 64) / 255).

Losses, over the images of one step (a random crop, and the whole image every
``source_image_every`` steps), each averaged over them:

- composition: CLIP loss of the composite against the composition text, plus the directional loss
  ``1 - cos(E(I_o) - E(I), T(comp) - T(src))`` (image embeddings of independently augmented views),
  times ``lambda_composition``;
- screen: CLIP loss of the greenscreen image against the screen text, times ``lambda_screen``;
- structure: MSE between the CLIP-token self-similarity matrices of ``I_o`` and ``I`` (the input's
  without gradient), times ``lambda_structure``;
- sparsity: ``lambda_alpha_l1 * mean(a) + lambda_alpha_l0 * mean(2 * (sigmoid(5 a) - 0.5))``,
  times ``lambda_sparsity``.

- bootstrap (only with ``bootstrap_epoch > 0``, for the first ``bootstrap_epoch`` steps; the
  official image config leaves it off): MSE between the opacity and the CLIP relevancy map of the
  input for the bootstrap text (:meth:`.clip.ClipExtractor.relevance`), both on a random crop
  covering ``bootstrapping_min_cover`` .. 1 of each side resized to the CLIP input size, times a
  weight that decays from ``lambda_bootstrap`` (``linear``: ``lambda * (1 - (step + 1) /
  bootstrap_epoch)``; ``exponential``: times 0.99 each step; ``none``: constant), at least
  ``lambda_bootstrap_min``. As in the official ``calculate_relevancy_loss``, the value is the
  last image's MSE divided by the number of images (the loop overwrites its sum).

The CLIP loss of an image against a text picks a random number n (1 .. number of templates) of
template embeddings, with replacement, and averages the text criterion (spherical distance by
default: ``2 * arcsin(|x - y| / 2) ** 2`` of the normalised embeddings; or ``1.2 * (1 - cos)``)
over the ``n_aug`` views and the n embeddings; the directional loss picks n and n indices the same
way among the composition / source templates. Text prompts are composed with the official
templates (:data:`AUGMENTATION_TEMPLATES` for the composition and source texts,
:data:`SCREEN_TEMPLATES` for the screen text).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

#: The green screen colour of ``Model.render`` (RGB in [0, 1]).
GREEN_SCREEN = (0.0, 177 / 255, 64 / 255)
#: Prompt templates of the composition and source texts (official ``get_augmentations_template``).
AUGMENTATION_TEMPLATES = (
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.", "image of {}.",
    "an image of {}.", "high quality image of {}.", "a high quality image of {}.", "the {}.", "a {}.",
    "{}.", "{}", "{}!", "{}...",
)
#: Prompt templates of the screen text (official ``get_screen_template``).
SCREEN_TEMPLATES = ("{} over a green screen.", "{} in front of a green screen.")
#: The official cosine criterion's scale (``cosine_loss(x, y, scaling=1.2)``).
COSINE_SCALING = 1.2
#: The slope of the official pseudo-L0 ("squished sigmoid") sparsity term.
L0_SLOPE = 5.0


#: Decay of the ``exponential`` bootstrap schedule per step (official ``LossG``).
BOOTSTRAP_EXP_DECAY = 0.99
BOOTSTRAP_SCHEDULERS = ("linear", "exponential", "none")


@dataclasses.dataclass
class Bootstrap:
    """The relevancy bootstrap term's settings (official ``bootstrap_text``, ``bootstrap_epoch``,
    ``lambda_bootstrap``, ``lambda_bootstrap_min``, ``bootstrap_scheduler``,
    ``bootstrapping_min_cover``, ``relevancy_num_layers``)."""

    text: str
    epochs: int
    weight: float
    weight_min: float
    scheduler: str
    min_cover: float
    start_layer: int

    def __post_init__(self) -> None:
        if self.scheduler not in BOOTSTRAP_SCHEDULERS:
            raise ValueError(f"bootstrap scheduler must be one of {list(BOOTSTRAP_SCHEDULERS)}, got {self.scheduler!r}")
        self._current = float(self.weight)  # the exponential schedule's running weight

    def weight_at(self, step: int) -> float:
        """The term's weight at ``step`` (0-based; call once per step, in order: the exponential
        schedule keeps state, as the official one does)."""
        if self.scheduler == "linear":
            w = self.weight * (1 - (step + 1) / self.epochs)
        elif self.scheduler == "exponential":
            self._current *= BOOTSTRAP_EXP_DECAY
            w = self._current
        else:
            w = self.weight
        return max(w, self.weight_min)


def compose(text: str, templates: Sequence[str]) -> list[str]:
    return [t.format(text) for t in templates]


# -- compositing ------------------------------------------------------------------------------
def render(net_output: torch.Tensor, background: torch.Tensor) -> dict[str, torch.Tensor]:
    """The generator's [B, 4, H, W] output over ``background`` [B, 3, H, W]: ``edit`` (RGB),
    ``alpha`` (the opacity repeated on 3 channels), ``composite`` and ``edit_on_greenscreen``."""
    edit = net_output[:, :3]
    alpha = net_output[:, 3:4].expand(-1, 3, -1, -1)
    green = torch.tensor(GREEN_SCREEN, dtype=edit.dtype, device=edit.device).view(1, 3, 1, 1)
    return {
        "edit": edit,
        "alpha": alpha,
        "composite": alpha * edit + (1 - alpha) * background,
        "edit_on_greenscreen": alpha * edit + (1 - alpha) * green,
    }


# -- text criteria ----------------------------------------------------------------------------
def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared great-circle distance (x2) between the normalised rows of ``x`` and ``y``."""
    x = F.normalize(x, dim=-1)
    y = F.normalize(y, dim=-1)
    return ((x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)).mean()


def cosine_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return COSINE_SCALING * (1 - F.cosine_similarity(x, y).mean())


TEXT_CRITERIA: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "spherical": spherical_dist_loss,
    "cosine": cosine_loss,
}


# -- image terms --------------------------------------------------------------------------------
def sparsity_loss(alphas: Sequence[torch.Tensor], lambda_l0: float, lambda_l1: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, l0, l1) of the official ``calculate_alpha_reg``: L1 = mean opacity, pseudo-L0 =
    mean of ``2 * (sigmoid(5 a) - 0.5)``, each averaged over the images; total =
    ``lambda_l1 * L1 + lambda_l0 * L0``."""
    l1 = sum(a.mean() for a in alphas) / len(alphas)
    l0 = sum(torch.mean((torch.sigmoid(a * L0_SLOPE) - 0.5) * 2.0) for a in alphas) / len(alphas)
    return lambda_l1 * l1 + lambda_l0 * l0, l0, l1


class Text2LIVELoss:
    """The official ``LossG`` for one edit: text embeddings computed once, then one call per step.

    ``extractor``: a :class:`methods.text2live.clip.ClipExtractor`; ``texts``: ``{"screen", "comp",
    "src"}``; ``weights``: ``lambda_structure``, ``lambda_composition``, ``lambda_sparsity``,
    ``lambda_alpha_l0``, ``lambda_alpha_l1``, ``lambda_screen``; ``criterion``: ``spherical`` |
    ``cosine``; ``rng``: the numpy generator drawing the number of text embeddings per term and
    the bootstrap crop's size (the indices and every augmentation come from torch's global RNG,
    seeded by the caller); ``bootstrap``: the relevancy term's settings, or None (off).
    """

    def __init__(self, extractor: Any, texts: dict[str, str], weights: dict[str, float], criterion: str,
                 rng: np.random.Generator, bootstrap: Bootstrap | None = None):
        self.extractor = extractor
        self.weights = dict(weights)
        self.criterion = TEXT_CRITERIA[criterion]
        self.rng = rng
        self.src_e = extractor.text_embeddings(compose(texts["src"], AUGMENTATION_TEMPLATES))
        self.comp_e = extractor.text_embeddings(compose(texts["comp"], AUGMENTATION_TEMPLATES))
        self.screen_e = extractor.text_embeddings(compose(texts["screen"], SCREEN_TEMPLATES))
        self.bootstrap = bootstrap
        # the bootstrap text as it is, without templates (official ClipRelevancy)
        self.bootstrap_e = extractor.text_embeddings([bootstrap.text]) if bootstrap is not None else None

    # the terms ---------------------------------------------------------------------------------
    def clip_loss(self, images: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Text criterion between each image's augmented views and a random draw of ``targets``."""
        n = int(self.rng.integers(1, len(targets) + 1))
        chosen = targets[torch.randint(len(targets), (n,))]
        loss = 0.0
        for img in images:
            img_e = self.extractor.image_embedding(img)
            for t in chosen:
                loss = loss + self.criterion(img_e, t.unsqueeze(0))
        return loss / (len(images) * n)

    def direction_loss(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                       targets: torch.Tensor) -> torch.Tensor:
        """``1 - cos(E(out) - E(in), T(target) - T(src))`` over a random draw of template pairs."""
        m = min(len(self.src_e), len(targets))
        n = int(self.rng.integers(1, m + 1))
        idx = torch.randint(m, (n,))
        dirs = targets[idx] - self.src_e[idx]
        loss = 0.0
        for x, y in zip(inputs, outputs):
            in_e = self.extractor.image_embedding(x)
            out_e = self.extractor.image_embedding(y)
            for d in dirs:
                loss = loss + 1 - F.cosine_similarity(out_e - in_e, d.unsqueeze(0)).mean()
        return loss / (len(outputs) * n)

    def structure_loss(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """MSE between the token self-similarities of each output and its input."""
        loss = 0.0
        for x, y in zip(inputs, outputs):
            with torch.no_grad():
                target = self.extractor.self_similarity(x)
            loss = loss + F.mse_loss(self.extractor.self_similarity(y), target)
        return loss / len(outputs)

    def bootstrap_loss(self, alphas: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """MSE between each opacity ([1, 3, h, w]) and its input's relevancy map, on a common
        random crop resized to the CLIP input size; the official value (see the module doc)."""
        assert self.bootstrap is not None and self.bootstrap_e is not None
        s = self.extractor.input_size
        loss = torch.zeros((), device=alphas[0].device)
        for a, x in zip(alphas, inputs):
            both = torch.cat([a, x])
            if self.bootstrap.min_cover < 1:  # official RandomSizeCrop (no-op at min_cover 1)
                h, w = both.shape[-2:]
                cover = self.rng.uniform(self.bootstrap.min_cover, 1)
                both = T.RandomCrop((int(h * cover), int(w * cover)))(both)
            both = T.Resize((s, s), antialias=False)(both)  # as the official (torchvision 0.11) resize
            rel = self.extractor.relevance(both[1:2], self.bootstrap_e, self.bootstrap.start_layer)
            loss = F.mse_loss(both[0], rel.expand(3, s, s))  # overwritten, as the official loop does
        return loss / len(alphas)

    # one step ----------------------------------------------------------------------------------
    def __call__(self, renders: Sequence[dict[str, torch.Tensor]], inputs: Sequence[torch.Tensor],
                 step: int | None = None) -> dict[str, torch.Tensor]:
        """Every term and ``loss`` (the weighted total) for this step's ``renders`` (one
        :func:`render` output per image, batch of 1) of ``inputs`` ([1, 3, h, w] each); ``step``
        (0-based) decides the bootstrap term (None: left out). Terms with a zero weight are not
        computed (as in the official code)."""
        w = self.weights
        comp = [r["composite"] for r in renders]
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=comp[0].device)
        b = self.bootstrap
        if b is not None and step is not None and step < b.epochs and b.weight > 0:
            losses["loss_bootstrap"] = self.bootstrap_loss([r["alpha"] for r in renders], inputs)
            weight = b.weight_at(step)
            losses["lambda_bootstrap"] = torch.tensor(weight)
            total = total + losses["loss_bootstrap"] * weight
        if w["lambda_structure"] > 0:
            losses["loss_structure"] = self.structure_loss(inputs, comp)
            total = total + losses["loss_structure"] * w["lambda_structure"]
        if w["lambda_composition"] > 0:
            losses["loss_comp_clip"] = self.clip_loss(comp, self.comp_e)
            losses["loss_comp_dir"] = self.direction_loss(inputs, comp, self.comp_e)
            total = total + (losses["loss_comp_clip"] + losses["loss_comp_dir"]) * w["lambda_composition"]
        if w["lambda_sparsity"] > 0:
            s, l0, l1 = sparsity_loss([r["alpha"] for r in renders], w["lambda_alpha_l0"], w["lambda_alpha_l1"])
            losses.update(loss_sparsity=s, loss_sparsity_l0=l0, loss_sparsity_l1=l1)
            total = total + s * w["lambda_sparsity"]
        if w["lambda_screen"] > 0:
            losses["loss_screen"] = self.clip_loss([r["edit_on_greenscreen"] for r in renders], self.screen_e)
            total = total + losses["loss_screen"] * w["lambda_screen"]
        losses["loss"] = total
        return losses
