"""Energy guidance of DragonDiffusion (ICLR 2024) and DiffEditor (CVPR 2024).

Official code: ``MC-E/DragonDiffusion`` (f9b5bdf) ``src/models/Sampler.py``: ``guidance_move``,
``guidance_drag``, ``guidance_landmark`` (face), ``guidance_appearance``, ``guidance_paste``;
weights and strengths from the sliders of ``src/demo/demo.py``. Our own code, written from it.

Common form. The estimator (:class:`~methods.dragon.estimator.FeatureEstimator`) gives the
decoder features of up_blocks[1] and [2] for the current latent z_t (with gradient) and, without
gradient, for the inverted source latent of the same step (paste / appearance: also for the
inverted reference). Each feature map is upsampled (nearest) to twice the size of the finer one
(the feature grid, one cell = 4 working pixels; ``up_scale`` = 2). Similarities are cosines over
channels, ``sim = (cos + 1) / 2`` except where noted, and the terms have the form
``w / (1 + 4 * mean(sim))`` (to be made small by raising the similarity) or ``w * mean(sim)``
(to lower it). Per task (``n_s`` = 2 feature scales, ``N`` = points):

* move (``guidance_move``): edit = sum_s 0.5 * w_edit / (1 + 4 mean cos(cur[target place],
  src_resized[object place])) with the *raw* cosine; content group = sum_s 0.5 * w_content /
  (1 + 4 mean cos(src, cur)[other]) (raw cosine) + sum_s 0.5 * w_contrast * mean sim(cur, src)
  [vacated part] + sum_s w_inpaint / (1 + 4 sim(mean cur[vacated], mean src[other])) (no 0.5).
* drag (``guidance_drag``): edit group = [sum_s sum_i w_edit / (1 + 4 mean sim(cur[target_i],
  src[handle_i])) + w_inpaint * mean sim(cur, src)[handle_i minus target_i]] / (n_s N);
  content = sum_s w_content / (1 + 4 mean sim(src, cur)[outside mask]) / n_s.
* face (``guidance_landmark``): edit only: sum_s sum_i w_edit / (1 + 4 mean sim(cur[target_i],
  src[source_i])) / (n_s N) (``w_inpaint`` is passed to it by the demo but unused).
* appearance (``guidance_appearance``): content = sum_s w_content / (1 + 4 mean sim(cur, base)
  [outside base mask]); edit = sum_s w_edit / (1 + 4 sim(mean cur[base mask], mean ref[ref mask])).
* paste (``guidance_paste``): content as appearance; edit = sum_s w_edit / (1 + 4 mean sim(
  cur[base mask], ref[ref mask])) pixel by pixel (row-major order of the two masks).

A term over an empty region is left out (the code would take the mean of nothing, NaN in the
energy's value but no contribution to its gradient, so the gradients agree).

Guidance (what :meth:`EnergyGuidance.gradient` returns, added by the sampler to the noise
prediction used for x0 only): ``s = energy_scale``, the ``energy_scale`` argument of
``Sampler.edit`` = the demo's slider value x 1e3 (``model.py``; :data:`DEFAULT_ENERGY_SCALE`),
and the per-task factor (8e-2 move, 4e-2 others); DiffEditor's regional mix
(paper Eq. 8; the code does it in every guidance_* for both algorithms)
``factor * (m * grad(s E_edit) + (1 - m) * grad(s E_content))`` with m the task's guidance mask
(move: the target place; drag: the mask; paste / appearance: the base mask; face: everywhere),
or with ``regional=False`` the plain ``factor * grad(s (E_edit + E_content))``: DragonDiffusion
as DiffEditor sec. 3.5 describes it ("the scope of the gradient guidance they generate is global and
overlapping"). Note: the released code's alg 'D' (DragonDiffusion) goes through the same
``guidance_*`` functions and so mixes regionally too; both versions were released together
(2024-02-04), so the code cannot tell which one produced DragonDiffusion's published numbers.

Not specified by the paper (DiffEditor refers to DragonDiffusion for the energies): everything
above comes from the code; the paper gives only Eq. 4 (eps + eta * grad E) and Eq. 8 (regional).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .tasks import TASK_KINDS, DragonTask

@dataclasses.dataclass(frozen=True)
class EnergyWeights:
    """The weights of the edit, content, contrast and inpainting terms (``w_edit`` ... in
    ``Sampler.guidance_*``; per-task defaults from the src/demo/demo.py sliders)."""

    w_edit: float
    w_content: float = 0.0
    w_contrast: float = 0.0
    w_inpaint: float = 0.0


DEFAULT_WEIGHTS: dict[str, EnergyWeights] = {
    "move": EnergyWeights(w_edit=4.0, w_content=6.0, w_contrast=0.2, w_inpaint=0.8),
    "drag": EnergyWeights(w_edit=4.0, w_content=6.0, w_contrast=0.0, w_inpaint=0.2),
    "face": EnergyWeights(w_edit=12.0, w_content=0.0, w_contrast=0.0, w_inpaint=0.4),
    "appearance": EnergyWeights(w_edit=3.5, w_content=5.0),
    "paste": EnergyWeights(w_edit=4.0, w_content=6.0),
}
#: demo.py "Classifier guidance strength (x1e3)" slider defaults per task
DEMO_ENERGY_SLIDER: dict[str, float] = {"move": 0.5, "drag": 2.0, "face": 3.0, "appearance": 2.0, "paste": 1.5}
#: model.py: energy_scale = slider * 1e3
ENERGY_UNIT = 1e3
#: Sampler.edit's energy_scale per task (what EnergyGuidance takes): slider x 1e3
DEFAULT_ENERGY_SCALE: dict[str, float] = {k: v * ENERGY_UNIT for k, v in DEMO_ENERGY_SLIDER.items()}
#: Sampler.guidance_*: the gradient's factor (move 8e-2, the others 4e-2)
TASK_FACTOR: dict[str, float] = {"move": 8e-2, "drag": 4e-2, "face": 4e-2, "appearance": 4e-2, "paste": 4e-2}
#: guidance_move's per-scale loss_scale
MOVE_LOSS_SCALE = (0.5, 0.5)
#: the feature upsampling (demo/model.py: up_scale = 2)
UP_SCALE = 2


def weights_for(kind: str, overrides: Mapping[str, Any] | None = None) -> EnergyWeights:
    """:data:`DEFAULT_WEIGHTS` of ``kind`` with any non-None ``w_*`` of ``overrides`` replacing it."""
    base = DEFAULT_WEIGHTS[kind]
    if not overrides:
        return base
    vals = {f.name: overrides[f.name] for f in dataclasses.fields(EnergyWeights)
            if f.name in overrides and overrides[f.name] is not None}
    return dataclasses.replace(base, **{k: float(v) for k, v in vals.items()})


# --------------------------------------------------------------------------------------------
# Terms
# --------------------------------------------------------------------------------------------
def upsample(feats: list, up_scale: int = UP_SCALE, size: tuple[int, int] | None = None) -> list:
    """Each map resized (nearest, the code's ``F.interpolate`` default) to ``size`` or to
    ``up_scale`` x the last (finest) map's size."""
    import torch.nn.functional as F

    if size is None:
        size = (feats[-1].shape[-2] * up_scale, feats[-1].shape[-1] * up_scale)
    return [F.interpolate(f, size=(int(size[0]), int(size[1]))) for f in feats]


def vectors(feat, mask):
    """The feature vectors (n, C) of ``feat`` (1, C, H, W) at the True cells of ``mask`` (H, W),
    in row-major order (the code's ``feat[mask.repeat(1, C, 1, 1)].view(C, -1).permute(1, 0)``)."""
    return feat[0][:, mask].transpose(0, 1)


def cos(a, b):
    import torch.nn.functional as F

    return F.cosine_similarity(a, b, dim=1)  # nn.CosineSimilarity(dim=1) of the code


def sim01(a, b):
    return (cos(a, b) + 1.0) / 2.0


def _zero(like):
    return like.new_zeros(())


def _check_grid(feats: list, task: DragonTask, what: str) -> None:
    if task.feat_hw is not None and tuple(feats[-1].shape[-2:]) != tuple(task.feat_hw):
        raise ValueError(f"sample '{task.sample_id}': {what} features on a {tuple(feats[-1].shape[-2:])} grid, the "
                         f"task's feature grid is {tuple(task.feat_hw)} (working size {task.work_hw}, cell "
                         f"{task.feature_cell} px): estimator and task disagree")


def energy_terms(task: DragonTask, cur_raw: list, src_raw: list, weights: EnergyWeights,
                 ref_raw: list | None = None) -> dict[str, Any]:
    """The energies of ``task`` from the estimator's raw outputs (lists over scales, (1, C, h, w))
    for the current latent (``cur_raw``), the inverted source (``src_raw``) and, for paste /
    appearance, the inverted reference (``ref_raw``).

    Returns ``{"edit", "content", "contrast", "inpaint", "E_edit", "E_content"}``: the four terms
    as the code weighs them (0 where the task has none) and the two groups the regional mix
    separates (move: content + contrast + inpaint form E_content; drag: edit + inpaint form E_edit,
    as in the code).
    """
    kind = task.kind
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}")
    cur = upsample(cur_raw)
    _check_grid(cur, task, "current")
    z = _zero(cur[0])
    t = {"edit": z, "content": z, "contrast": z, "inpaint": z}
    M = task.energy_masks
    w = weights
    n_s = len(cur)

    if kind == "move":
        src = upsample(src_raw)
        hf, wf = src[-1].shape[-2:]
        rs = task.resize_scale
        src_rs = upsample(src_raw, size=(int(hf * rs), int(wf * rs)))
        for s in range(n_s):
            ls = MOVE_LOSS_SCALE[s] if s < len(MOVE_LOSS_SCALE) else 1.0
            a, b = vectors(cur[s], M["cur"]), vectors(src_rs[s], M["tar"])
            if a.shape[0]:
                t["edit"] = t["edit"] + ls * w.w_edit / (1 + 4 * cos(a, b).mean())
            if M["other"].any():
                c = cos(src[s], cur[s])[0][M["other"]]
                t["content"] = t["content"] + ls * w.w_content / (1 + 4 * c.mean())
            if M["non_overlap"].any():
                a, b = vectors(cur[s], M["non_overlap"]), vectors(src[s], M["non_overlap"])
                t["contrast"] = t["contrast"] + ls * w.w_contrast * sim01(a, b).mean()
                if M["inpaint_ref"].any():
                    am = a.mean(0, keepdim=True)
                    bm = vectors(src[s], M["inpaint_ref"]).mean(0, keepdim=True)
                    t["inpaint"] = t["inpaint"] + w.w_inpaint / (1 + 4 * sim01(am, bm).mean())
        e_edit = t["edit"]
        e_content = t["content"] + t["contrast"] + t["inpaint"]
    elif kind in ("drag", "face"):
        src = upsample(src_raw)
        n_p = len(M["cur"])
        for s in range(n_s):
            for mc, mt in zip(M["cur"], M["tar"]):
                a, b = vectors(cur[s], mc), vectors(src[s], mt)
                t["edit"] = t["edit"] + w.w_edit / (1 + 4 * sim01(a, b).mean())
                if kind == "drag":
                    vacated = mt & mc.logical_not()
                    if vacated.any():
                        a, b = vectors(cur[s], vacated), vectors(src[s], vacated)
                        t["inpaint"] = t["inpaint"] + w.w_inpaint * sim01(a, b).mean()
            if kind == "drag" and M["other"].any():
                c = sim01(src[s], cur[s])[0][M["other"]]
                t["content"] = t["content"] + w.w_content / (1 + 4 * c.mean())
        t["edit"] = t["edit"] / n_s / n_p
        t["inpaint"] = t["inpaint"] / n_s / n_p
        t["content"] = t["content"] / n_s
        e_edit = t["edit"] + t["inpaint"]
        e_content = t["content"]
    else:  # paste, appearance
        if ref_raw is None:
            raise ValueError(f"sample '{task.sample_id}': a {kind} needs the reference's features")
        base = upsample(src_raw)
        ref = upsample(ref_raw)
        outside = M["base"].logical_not()
        for s in range(n_s):
            if outside.any():
                a, b = vectors(cur[s], outside), vectors(base[s], outside)
                t["content"] = t["content"] + w.w_content / (1 + 4 * sim01(a, b).mean())
            a, b = vectors(cur[s], M["base"]), vectors(ref[s], M["ref"])
            if kind == "appearance":
                sim = sim01(a.mean(0, keepdim=True), b.mean(0, keepdim=True))
            else:
                if a.shape != b.shape:
                    raise ValueError(f"sample '{task.sample_id}': paste base and reference masks cover {a.shape[0]} and "
                                     f"{b.shape[0]} feature cells; they must match cell for cell")
                sim = sim01(a, b)
            t["edit"] = t["edit"] + w.w_edit / (1 + 4 * sim.mean())
        e_edit, e_content = t["edit"], t["content"]
    t["E_edit"], t["E_content"] = e_edit, e_content
    return t


# --------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------
class EnergyGuidance:
    """The guidance term of one task (see the module docstring).

    energy_scale: ``Sampler.edit``'s ``energy_scale``: the demo's slider x 1e3
        (:data:`DEFAULT_ENERGY_SCALE`: move 500, drag 2000, face 3000, appearance 2000, paste
        1500). 0 turns guidance off: :meth:`gradient` returns exact zeros without running the
        estimator.
    weights: :class:`EnergyWeights` (default: :data:`DEFAULT_WEIGHTS` of the task).
    regional: DiffEditor / the code's mix of the two gradients by the guidance mask (True), or
        the plain gradient of the sum (False).
    factor: the per-task factor (default :data:`TASK_FACTOR`).
    reuse_reference_features: the source / reference features depend on the step only; keep them
        for a repeated step (time travel) instead of recomputing them as the code does (same
        values, fewer estimator calls).
    """

    def __init__(self, estimator: Any, task: DragonTask, *, energy_scale: float, weights: EnergyWeights | None = None,
                 regional: bool = True, factor: float | None = None,
                 reuse_reference_features: bool = True):
        if task.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {task.kind!r}")
        self.estimator = estimator
        self.task = task
        self.energy_scale = float(energy_scale)
        self.weights = weights if weights is not None else DEFAULT_WEIGHTS[task.kind]
        self.regional = bool(regional)
        self.factor = TASK_FACTOR[task.kind] if factor is None else float(factor)
        self.reuse = bool(reuse_reference_features)
        self._cache: dict[str, tuple[Any, Any, list]] = {}
        self.last_energies: dict[str, float] = {}

    @property
    def scale(self) -> float:
        return self.energy_scale

    def _ref_features(self, name: str, latent, t, text_emb) -> list:
        import torch

        key_t = int(t) if not hasattr(t, "item") else int(t.item())
        hit = self._cache.get(name)
        if self.reuse and hit is not None and hit[0] == key_t and hit[1].shape == latent.shape \
                and hit[1].device == latent.device and torch.equal(hit[1], latent):
            return hit[2]
        with torch.no_grad():
            feats = [f.detach() for f in self.estimator.features(latent, t, text_emb)]
        if self.reuse:
            self._cache[name] = (key_t, latent.detach().clone(), feats)
        return feats

    def energy(self, z_t, t, refs: Mapping[str, Any], text_emb) -> dict[str, Any]:
        """The energy terms (:func:`energy_terms`, unscaled) at ``z_t``, differentiable wrt it
        (``z_t`` must require grad for :meth:`gradient`; the caller decides)."""
        if "source" not in refs:
            raise ValueError(f"sample '{self.task.sample_id}': refs must hold the inverted source latent 'source'")
        src = self._ref_features("source", refs["source"], t, text_emb)
        ref = None
        if self.task.kind in ("paste", "appearance"):
            if refs.get("reference") is None:
                raise ValueError(f"sample '{self.task.sample_id}': a {self.task.kind} needs refs['reference'], the "
                                 "inverted reference latent of this step")
            ref = self._ref_features("reference", refs["reference"], t, text_emb)
        cur = self.estimator.features(z_t, t, text_emb)
        return energy_terms(self.task, cur, src, self.weights, ref_raw=ref)

    def gradient(self, z_t, t, refs: Mapping[str, Any], text_emb):
        """The guidance term for ``z_t`` (same shape and dtype), already scaled and mixed."""
        import torch

        if self.scale == 0.0:
            return torch.zeros_like(z_t)
        with torch.enable_grad():
            z = z_t.detach().requires_grad_(True)
            terms = self.energy(z, t, refs, text_emb)
            self.last_energies = {k: float(v.detach()) for k, v in terms.items()}
            s = self.scale
            e_edit, e_con = terms["E_edit"], terms["E_content"]
            if self.regional:
                m = self.task.guidance_mask.to(z.device, z.dtype)
                g = torch.zeros_like(z)
                if e_edit.requires_grad:
                    g_edit = torch.autograd.grad(e_edit * s, z, retain_graph=e_con.requires_grad)[0]
                    g = g + g_edit * m
                if e_con.requires_grad:
                    g_con = torch.autograd.grad(e_con * s, z)[0]
                    g = g + g_con * (1 - m)
            else:
                total = e_edit + e_con
                g = torch.autograd.grad(total * s, z)[0] if total.requires_grad else torch.zeros_like(z)
        return (g * self.factor).detach()
