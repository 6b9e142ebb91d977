"""The harness adapter shared by ``dragondiffusion`` and ``diffeditor`` (registered in
``methods/dragondiffusion.py`` / ``methods/diffeditor.py``).

One edit (code ``src/demo/model.py:run_*`` + ``src/models/Sampler.py:Sampler.edit``):

1. the source resized to the working size (area ``resolution**2``, sides multiples of 64,
   Lanczos: :func:`.tasks.work_size` / :func:`.tasks.resize_to_work`); the task and its masks from
   the sample's fields (:func:`.tasks.build_task`);
2. **preparation** (``prep_seconds``): VAE encoding, text embeddings, DDIM inversion of the
   source (paste / appearance: with the reference, one batch) keeping every latent and the
   memory bank (:func:`.inversion.invert`), and for DiffEditor the image-prompt tokens;
3. **inference**: the start latent (:func:`.tasks.init_latent`), the step loop
   (:func:`.sampler.sample`) with the memory bank, the energy guidance
   (:class:`.energy.EnergyGuidance` over a second UNet, :class:`.estimator.FeatureEstimator`),
   the image prompt, regional SDE and time travel as the method's switches say; VAE decoding,
   resized (bicubic) back to the source size.

Network calls (``info["network_calls"]``): ``unet`` (inversion, sampling rows, time-travel
rollbacks), ``estimator`` (the guidance's second UNet), ``image_encoder`` and ``image_proj``
(DiffEditor), ``text_encoder``, ``vae_encode`` / ``vae_decode``.

Not specified by the paper (parameters; defaults from the code, ``conf/method/*.yaml`` cites each):
which 17 landmarks DiffEditor's 17-point setting drags (``point_subset: 17pt`` = the jaw line 0-16);
the step windows for a step count other than the code's 50 (evaluated at ``j = i * 50 // T``);
the image prompt's step window (10 <= i < 20) and gamma (0.1, face 0.05); the memory-bank windows
(i >= 5; mix i <= 35); the energy scales and weights per task (demo values); the reference's prompt
(samples have none: the task prompt); the estimator (a second UNet with the same weights); text-only
inversion (the demo; the paper's Fig. 10 inverts with the image prompt: not offered).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import numpy as np

from harness.types import MethodOutput, Sample, SampleError, SkipSample

from .._diffusion_common import (DiffusionMethod, _check_number, auto_field, check_choice, from_pipeline_output,
                                 text_embeddings)
from ..diffusion import counting

#: demo default "Classifier guidance strength (x1e3)" per task (src/demo/demo.py), times 1e3
ENERGY_SCALES = {"move": 500.0, "drag": 2000.0, "face": 3000.0, "appearance": 2000.0, "paste": 1500.0}
#: demo default classifier-free guidance per task (src/demo/demo.py); the paper uses 5 (sec. 4.1)
DEMO_GUIDANCE = {"move": 4.0, "drag": 4.0, "face": 4.0, "appearance": 5.0, "paste": 4.0}
PAPER_GUIDANCE = 5.0
#: SDE_strength (demo default 0.4; run_drag_face: 0.2, also outside, over the whole image)
SDE_INSIDE = {"face": 0.2}
SDE_INSIDE_DEFAULT = 0.4
PAPER_SDE_OUTSIDE = 0.2  # paper Eq. 7: (eta_1, eta_2) = (0.4, 0.2) on tau_SDE
#: ip_scale (gamma): model.py: 0.1, run_drag_face 0.05
IP_SCALES = {"face": 0.05}
IP_SCALE_DEFAULT = 0.1
VARIANTS = ("code", "paper")
CFG_VARIANTS = ("paper", "demo")
OWNER = "dragon"


class DragonMethod(DiffusionMethod):
    """Base adapter (see the module docstring); subclasses set :attr:`algorithm`."""

    version: ClassVar[str] = "1"
    algorithm: ClassVar[str] = "diffeditor"
    tiny_kind: ClassVar[str] = "sd15"
    prompt_field: ClassVar[str] = "source_caption"
    requires: ClassVar[tuple[str, ...]] = ("source",)

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # paper sec. 4.1: SD 1.5
        num_inference_steps: int | Literal["auto"] = auto_field(50, 10)  # sec. 4.1: 50 DDIM steps
        guidance_scale: float = PAPER_GUIDANCE  # sec. 4.1: CFG 5 (cfg_variant=demo: the demo's per-task values)
        cfg_variant: Literal["paper", "demo"] = "paper"
        # working size: area resolution**2, sides multiples of 64 (utils.resize_numpy_image); the
        # paper's timings are at 512 x 512 (sec. 4.2), the demo's slider defaults to 768
        resolution: int | Literal["auto"] | None = auto_field(512, 64)
        # -- the task (methods/dragon/tasks.py:TaskParams) --
        task: str = "auto"
        feature_cell: int = 4
        resize_scale: float = 1.0
        move_mask: str = "union"
        move_init: str = "code"
        dx: float = 0.0
        dy: float = 0.0
        prompt: str | None = None
        face_prompt: str = "a photo of a human face"
        # drag / face: the points dragged (methods/_common.py handle_points): all, or 17pt / 68pt of a
        # dlib68 face (DiffEditor sec. 4.2 / Table 1: 17- and 68-landmark dragging; which 17 is not
        # specified by the paper: the jaw line 0-16 is the harness's choice)
        point_subset: str = "all"
        # -- energy guidance --
        energy_scale: float | None = None  # None: the demo's per-task value x 1e3 (ENERGY_SCALES)
        regional_guidance: bool = True  # DiffEditor Eq. 8; DragonDiffusion: plain sum
        guidance_end: int = 30  # Sampler.edit: i < 30
        guidance_dense_end: int = 10  # Sampler.edit: every step for i < 10, even steps after
        guidance_rule: Literal["code", "paper"] = "code"  # paper Alg. 1: even steps only
        # -- memory bank (visual cross-attention) --
        memory_bank: bool = True
        offload_memory_bank: bool = False
        bank_start: int = 5  # replace / concat for i >= 5
        bank_mix_end: int = 35  # mix for i <= 35
        # -- regional SDE (DiffEditor) --
        regional_sde: bool = True
        sde_variant: Literal["code", "paper"] = "code"  # eta outside m_edit: code 0, paper 0.2
        sde_strength: float | None = None  # eta inside: None = 0.4 (face 0.2)
        sde_strength_outside: float | None = None  # None = by variant (code 0; face 0.2; paper 0.2)
        sde_start: int = 11  # SDE on steps sde_start <= i < sde_end: the code's 10 < i < 20
        sde_end: int = 20
        # -- time travel (DiffEditor) --
        time_travel: bool = True
        time_travel_start: int = 21  # the even steps time_travel_start <= i < time_travel_end: 20 < i < 30
        time_travel_end: int = 30
        time_travel_repeats: int = 3  # U
        # -- image prompt (DiffEditor) --
        image_prompt: bool = True
        ip_weights: str | None = None  # local path of ip_sd15_64.bin (HF Adapter/DragonDiffusion)
        image_encoder: str = "h94/IP-Adapter"
        image_encoder_subfolder: str = "models/image_encoder"
        ip_scale: float | None = None  # gamma: None = 0.1 (face 0.05)
        image_prompt_start: int = 10  # image branch on for image_prompt_start <= i < image_prompt_end
        image_prompt_end: int = 20

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(OWNER, "cfg_variant", self.cfg_variant, CFG_VARIANTS)
            check_choice(OWNER, "sde_variant", self.sde_variant, VARIANTS)
            check_choice(OWNER, "guidance_rule", self.guidance_rule, ("code", "paper"))
            for name in ("guidance_end", "guidance_dense_end", "bank_start", "bank_mix_end", "feature_cell", "sde_start",
                         "sde_end", "time_travel_start", "time_travel_end", "image_prompt_start", "image_prompt_end"):
                _check_number(OWNER, name, getattr(self, name), 0, integer=True)
            _check_number(OWNER, "time_travel_repeats", self.time_travel_repeats, 1, integer=True)
            for name in ("energy_scale", "sde_strength", "sde_strength_outside", "ip_scale"):
                if getattr(self, name) is not None:
                    _check_number(OWNER, name, getattr(self, name), 0.0)
            if self.resolution is None:
                raise ValueError(f"{OWNER}: 'resolution' must be set (the working area's side)")
            from .tasks import TaskParams

            TaskParams.from_params(self)  # the task parameters' own checks

    def __init__(self, params: Any = None):
        super().__init__(params)
        self._image_prompt: Any = None
        self._estimator: Any = None

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:  # pragma: no cover
        raise NotImplementedError(f"{self.name} runs its own inversion and step loop (edit())")

    # -- weights ---------------------------------------------------------------------------------
    def uses_image_prompt(self) -> bool:
        return self.algorithm == "diffeditor" and bool(self.params.image_prompt)

    def weights_status(self) -> list[tuple[str, str | None]]:
        """SD 1.5 (the base's entry), and with the image prompt on: the released ``ip_sd15_64.bin``
        (a local file) and the OpenCLIP ViT-H/14 image encoder (hub id or local folder)."""
        import os

        from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL

        out = super().weights_status()
        if not self.uses_image_prompt():
            return out
        p = self.params
        if p.backbone == "tiny" and not p.ip_weights:
            return [*out, (f"image prompt: tiny encoder and resampler ({RANDOM_WEIGHTS_LABEL})", None)]
        get = ("download ip_sd15_64.bin from the Hugging Face repo Adapter/DragonDiffusion (model/ip_sd15_64.bin) "
               "and set method.ip_weights=<its path>; or run without the image prompt (method.image_prompt=false)")
        if not p.ip_weights:
            out.append(("image prompt ip_sd15_64.bin", f"method.ip_weights is not set: {get}"))
        elif not os.path.isfile(os.path.expanduser(p.ip_weights)):
            out.append((f"image prompt {p.ip_weights}", f"the file does not exist: {get}"))
        else:
            out.append((f"image prompt {p.ip_weights}", None))
        what = f"image encoder {p.image_encoder} ({p.image_encoder_subfolder})"
        src = os.path.expanduser(p.image_encoder)
        if os.path.isdir(src):
            out.append((what, None))
        else:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(p.image_encoder, f"{p.image_encoder_subfolder}/config.json")
            out.append((what, None if isinstance(hit, str) else (
                f"not in the Hugging Face hub cache; put the {p.image_encoder} snapshot there (HF_HOME / "
                "HF_HUB_CACHE) or set method.image_encoder=<local folder of the encoder>")))
        return out

    def prepare(self) -> None:
        super().prepare()
        if self.uses_image_prompt() and self._image_prompt is None:
            from .image_prompt import load_image_prompt, tiny_image_prompt

            p = self.params
            unet = self._loaded.pipeline.unet
            if p.backbone == "tiny" and not p.ip_weights:
                self._image_prompt = tiny_image_prompt(unet)  # random weights, as the tiny backbone
            else:
                self._image_prompt = load_image_prompt(unet, p.ip_weights, p.image_encoder, p.image_encoder_subfolder,
                                                       allow_downloads=p.allow_downloads)
            counting.watch_module("image_encoder", self._image_prompt.encoder)
            counting.watch_module("image_proj", self._image_prompt.projection)

    def estimator(self, unet: Any) -> Any:
        """The feature estimator: a second UNet with the sampling UNet's weights (the code loads
        the same SD 1.5 checkpoint twice). Its parameters share the sampling UNet's tensors (both
        frozen), so the copy costs no weight memory; its own module is counted as ``estimator``."""
        if self._estimator is not None and self._estimator[0] is unet:
            return self._estimator[1]
        import torch
        from diffusers import UNet2DConditionModel

        from .estimator import FeatureEstimator

        with torch.device("meta"):
            twin = UNet2DConditionModel.from_config(unet.config)
        twin.load_state_dict(dict(unet.state_dict()), assign=True)
        twin = twin.eval().requires_grad_(False)
        est = FeatureEstimator(twin, counter_name="estimator")
        self._estimator = (unet, est)
        return est

    # -- samples ---------------------------------------------------------------------------------
    def working_size(self, height: int, width: int) -> tuple[int, int]:
        from .tasks import work_size

        return work_size(height, width, int(self.params.resolution))

    def check(self, sample: Sample) -> str | None:
        from .tasks import task_kind

        from .._common import handle_points

        try:
            kind = task_kind(sample, self.params.task)
            if kind in ("face", "drag"):
                handle_points(sample, self.params.point_subset)
        except (SampleError, ValueError) as e:
            return f"method '{self.name}': {e}"
        return None

    def task_values(self, kind: str) -> dict[str, float]:
        """The per-task numbers the parameters leave to the task (None = the code's value)."""
        p = self.params
        guidance = DEMO_GUIDANCE[kind] if p.cfg_variant == "demo" else float(p.guidance_scale)
        energy = ENERGY_SCALES[kind] if p.energy_scale is None else float(p.energy_scale)
        eta_in = SDE_INSIDE.get(kind, SDE_INSIDE_DEFAULT) if p.sde_strength is None else float(p.sde_strength)
        if p.sde_strength_outside is not None:
            eta_out = float(p.sde_strength_outside)
        elif p.sde_variant == "paper":
            eta_out = PAPER_SDE_OUTSIDE
        else:
            eta_out = eta_in if kind == "face" else 0.0  # run_drag_face: SDE_strength_un = SDE_strength
        ip = IP_SCALES.get(kind, IP_SCALE_DEFAULT) if p.ip_scale is None else float(p.ip_scale)
        return {"guidance_scale": guidance, "energy_scale": energy, "eta_in": eta_in, "eta_out": eta_out,
                "ip_scale": ip}

    def plan(self) -> Any:
        from .sampler import Plan

        p = self.params
        dragon = self.algorithm == "dragondiffusion"
        return Plan(algorithm=self.algorithm, num_steps=int(p.num_inference_steps), guidance_end=int(p.guidance_end),
                    guidance_dense_end=int(p.guidance_dense_end), guidance_rule=p.guidance_rule,
                    sde=bool(p.regional_sde) and not dragon, sde_window=(int(p.sde_start), int(p.sde_end)),
                    time_travel=bool(p.time_travel) and not dragon,
                    time_travel_steps=tuple(j for j in range(int(p.time_travel_start), int(p.time_travel_end))
                                            if j % 2 == 0),
                    time_travel_repeats=int(p.time_travel_repeats),
                    image_window=(int(p.image_prompt_start), int(p.image_prompt_end)),
                    bank_start=int(p.bank_start), bank_mix_end=int(p.bank_mix_end))

    # -- the edit --------------------------------------------------------------------------------
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch
        from PIL import Image

        from ..diffusion.inversion import decode_latents, encode_image, make_schedule
        from .attention import MemoryBankController
        from .inversion import invert
        from .sampler import Conditioning, sample as run_sampler, steps_summary
        from .tasks import build_task, init_latent, resize_to_work

        p = self.params
        start = self.begin_edit(sample, seed)
        pipe = start.loaded.pipeline
        unet = pipe.unet
        work = resize_to_work(start.source, start.size)
        try:
            task = build_task(sample, work, params=p)
        except ValueError as e:  # SampleError included: names the sample and the field
            raise SkipSample(f"method '{self.name}': {e}") from e
        values = self.task_values(task.kind)
        n = int(p.num_inference_steps)
        stage: dict[str, float] = {}

        # ---- preparation: encodings, inversion (+ memory bank), image prompt ----
        t0 = time.perf_counter()
        sched = make_schedule(pipe.scheduler, n)
        z0 = encode_image(pipe, work)
        has_ref = task.kind in ("paste", "appearance")
        prompts = ["", task.prompt] + ([task.reference_prompt or task.prompt] if has_ref else [])
        embs = text_embeddings(pipe, prompts, z0)
        uncond, cond = embs[:1], embs[1:2]
        inv_cond = embs[1:]
        if has_ref:
            ref = task.reference
            ref_arr = np.asarray(ref.convert("RGB") if hasattr(ref, "convert") else ref)
            z0 = torch.cat([z0, encode_image(pipe, np.ascontiguousarray(ref_arr, dtype=np.uint8))])
        stage["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        inv = invert(unet, sched, z0, inv_cond, keep_bank=bool(p.memory_bank), offload=bool(p.offload_memory_bank),
                     latent_hw=task.latent_hw)
        stage["inversion"] = time.perf_counter() - t1
        c = Conditioning(cond=cond, uncond=uncond)
        if self.uses_image_prompt():
            t2 = time.perf_counter()
            ip = self._image_prompt
            images = [Image.fromarray(work)] + ([task.reference] if has_ref else [])
            im_c, im_u = ip.encode(images)
            c.image_cond, c.image_uncond = im_c.to(z0.dtype), im_u.to(z0.dtype)
            c.ip_procs = ip.processors(unet, 0.0)
            c.ip_scale = values["ip_scale"]
            stage["image_prompt"] = time.perf_counter() - t2
        prep = time.perf_counter() - start.t0

        # ---- inference: the step loop, decoding ----
        t3 = time.perf_counter()
        z_T = inv.latents[-1]
        z_start = init_latent(task, z_T[:1], z_T[1:2] if has_ref else None)
        bank = None
        if p.memory_bank:
            base = task.base_mask_work if task.base_mask_work is not None else task.base_mask
            ref = task.ref_mask_work if task.ref_mask_work is not None else task.ref_mask
            bank = MemoryBankController(inv.bank, task.memory_bank, latent_hw=task.latent_hw,
                                        base_mask=None if base is None else base.to(z0.device),
                                        ref_mask=None if ref is None else ref.to(z0.device))
        guidance = None
        if values["energy_scale"] != 0:
            from .energy import EnergyGuidance

            guidance = EnergyGuidance(self.estimator(unet), task, energy_scale=values["energy_scale"],
                                      regional=self.algorithm == "diffeditor" and bool(p.regional_guidance))
        trace: list = []
        z = run_sampler(unet, sched, z_start, self.plan(), c, guidance_scale=values["guidance_scale"],
                        guidance=guidance, refs=inv.refs, bank=bank, m_edit=task.m_edit.to(z0.device),
                        eta_in=values["eta_in"], eta_out=values["eta_out"], generator=start.generator, trace=trace)
        stage["sampling"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        u8 = decode_latents(pipe, z)
        stage["decode"] = time.perf_counter() - t4
        image = from_pipeline_output(u8.astype(np.float32) / 255.0, start.source_hw)
        info = self.edit_info(
            start, seed, prep,
            algorithm=self.algorithm, task=task.kind, prompt=task.prompt, point_subset=p.point_subset,
            dragged_points=0 if task.source_points is None else int(len(task.source_points)), memory_bank_mode=task.memory_bank,
            memory_bank_entries=len(inv.bank) if inv.bank is not None else 0,
            memory_bank_bytes=inv.bank.nbytes() if inv.bank is not None else 0,
            memory_bank_device=inv.bank.device() if inv.bank is not None else None,
            memory_bank_offloaded=bool(p.offload_memory_bank),
            memory_bank_applied=bank.applied if bank is not None else 0,
            image_prompt=self.uses_image_prompt(),
            image_prompt_weights=(self._image_prompt.label if self.uses_image_prompt() else None),
            sde_variant=p.sde_variant, cfg_variant=p.cfg_variant, **{f"used_{k}": v for k, v in values.items()},
            sde_noise_outside_max=max((r.outside_change for r in trace), default=0.0),
            stage_seconds=stage, **steps_summary(trace),
        )
        return MethodOutput(image=image, info=info)
