"""``partedit``: PartEdit, fine-grained part editing with learned part tokens (Cvejic, Eldesokey,
Wonka; ``shared/papers/partedit.md``; official code ``Gorluxor/PartEdit``, read at af50018).

One edit: the three-path SDXL sampler (:mod:`.sampler`: source, edit, localisation rows in one
batched UNet call per step) under the PartEdit controller (:mod:`.controller`: query sharing,
part-token capture, Prompt-to-Prompt word swap, feature blending with the previous step's part
mask), the mask of each step from the captured maps (:mod:`.mask`: aggregation over the layer
set, min-max, adaptive Otsu binarisation with ``omega``).

Which prompts (a harness rule, documented in the YAML):

- source prompt ``P_src``: ``meta["prompt_original"]`` (PartEdit-Bench) else ``source_caption``;
- edit prompt: the code's ``prompt.replace(subject, edit)`` when the sample has
  ``meta["subject"]`` (found in ``P_src``) and ``meta["edit"]``; else ``target_caption``;
- the P2P edit word (its cross-attention is replaced only for the first 40 % of the steps):
  ``edit_word`` when set, else ``meta["edit"]`` (the code's key, matched as one word: a
  multi-word edit never matches, as in the code), else the words of the edit prompt that differ
  from the source prompt;
- the part token: ``part_token`` (a name of the released set or a file path) when set, else
  ``meta["token_cls"]``, ``meta["part"]``, then ``sample.part``, looked up in ``token_dir``
  (:func:`.tokens.find_part_token`); the tiny backbone uses a random token of the tiny text
  width (:func:`.tokens.random_part_token`), labelled in the info and the table rows.

Synthetic or real (``source: auto``): ``meta["split"]`` decides when it is ``synth`` or ``real``
(PartEdit-Bench rows); otherwise a sample with ``meta["seed"]`` is a synthetic one (PartEdit-Bench
synth: the authors generated the source from ``P_src`` and that seed): the source
path is regenerated from the prompt and the seed, as the paper does, and the given source image
is only the reference the metrics compare with. Without a seed the source image is real: it is
inverted (edit-friendly DDPM, the paper's "Ours w/ Ledits++"; not wired in the official release)
and edited with ``guidance_real`` (12.5, paper appendix K). ``source: synthetic`` without a seed
uses the harness seed.

Output: the edit row (resized, bicubic, to the source's size); ``mask`` = the pixels the last
blended step took wholly or partly from the edit path (part mask > 0, resized bilinearly to the
source's size); ``info``: the soft mask's mean and the mask's area, the token, the layers, the
step window, the scheduler, the prompts.

torch is imported lazily (importing ``methods`` imports none).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, ClassVar, Literal

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample, SkipSample

from .._diffusion_common import (PROVIDE_WEIGHTS, DiffusionMethod, _check_number, auto_field, check_choice,
                                 from_pipeline_output, to_pil)
from ..diffusion import counting
from ..diffusion.loading import (MissingWeights, ModelSpec, downloads_allowed, hub_cache_dir, listing_hash,
                                 load_pipeline, resolve_revision)
from ..diffusion.tiny import RANDOM_WEIGHTS_LABEL, TINY_RESOLUTION, TINY_SEED, TINY_STEPS
from .mask import BINARIZE_RULES, LAYER_SETS  # torch-free at import, as .sampler
from .sampler import SCHEDULERS

OWNER = "partedit"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
SOURCES = ("auto", "synthetic", "real")
BINARIZATIONS = BINARIZE_RULES
P2P_KINDS = ("replace", "refine", "auto")
#: the tiny backbone's part token: a random (2, D) token of this seed (labelled)
TINY_TOKEN_SEED = TINY_SEED
TINY_TOKEN_LABEL = f"random part token ({RANDOM_WEIGHTS_LABEL})"


def _code_dtype(params: Any) -> str:
    """``dtype: auto`` with real weights: the code's fp16 where the edit runs on CUDA, else fp32
    (fp16 is refused on the CPU; the resolved value is in the cache key and the edit's info)."""
    from ..diffusion.loading import resolve_device

    return "fp16" if resolve_device(str(params.device)) == "cuda" else "fp32"


@METHODS.register("partedit")
class PartEdit(DiffusionMethod):
    """PartEdit on SDXL (see the module docstring)."""

    version: ClassVar[str] = "1"
    tiny_kind: ClassVar[str] = "sdxl"
    prompt_field: ClassVar[str] = "source_caption"
    requires: ClassVar[tuple[str, ...]] = ("source",)
    location_params: ClassVar[tuple[str, ...]] = ("token_dir",)

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        # -- weights (sec. 4.1 "pretrained SDXL"; model.py / default_pipeline) --
        model: str = SDXL_MODEL
        vae: str | None = FP16_VAE  # default_pipeline loads this VAE; None = the checkpoint's own VAE
        # the code runs fp16 (on a GPU); with real weights on a CPU, where fp16 is refused, fp32
        dtype: Literal["fp32", "fp16", "bf16", "auto"] = auto_field(_code_dtype, "fp32")
        # -- sampling (sec. 4.1; appendix K) --
        scheduler: Literal["ddim", "euler", "dpmsolver_sde"] = "ddim"  # paper 4.1: DDIM; demo: euler
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # T = 50 (sec. 4.1)
        guidance_scale: float = 7.5  # synthetic setting (appendix K; the code's default)
        guidance_real: float = 12.5  # real-image setting (appendix K, "Ours + edits real")
        eta: float = 0.0  # DDIM eta (the code's default 0)
        resolution: int | Literal["auto"] | None = auto_field(1024, TINY_RESOLUTION)  # SDXL's 1024 x 1024
        source: Literal["auto", "synthetic", "real"] = "auto"  # auto: meta["seed"] -> synthetic, else real
        # -- the part mask (sec. 3.3, Eq. 4-5; AttentionStore.calculate_mask_t_res) --
        t_e: int = 50  # blend for steps 0 < step < t_e (the code's edit_steps; paper t_e = T = 50)
        omega: float = 1.5  # Eq. 5 upper threshold omega * k (appendix C: 3k/2)
        binarization: Literal["partedit", "otsu", "binary_0.5", "none"] = "partedit"  # mask.binarize rule (Eq. 5)
        # code: the 40 layers of LAYERS_TO_USE; paper: the first 8 decoder layers (appendix E)
        layer_set: Literal["code", "code_name_order", "paper", "all"] = "code"
        mask_size: int | Literal["auto"] = auto_field(1024, TINY_RESOLUTION)  # maps upsampled to this (code: 1024)
        # -- part token (sec. 3.1; model.py PART_TOKENS) --
        part_token: str | None = None  # a token name of the released set or a .pt / .safetensors path; None = sample's
        token_dir: str | None = None  # folder holding the released token files (Aleksandar/PartEdit-extra pt/)
        edit_word: str | None = None  # P2P's 0.4-window word; None = meta["edit"] or the differing words
        # -- the code's mechanisms the paper does not describe (defaults = the code) --
        add_extra_step: bool = False  # extra UNet pass at the first timestep for a step-0 mask (code option)
        query_sharing: bool = True  # localisation-row queries := source-row queries (processor)
        p2p_replace: bool = True  # Prompt-to-Prompt cross-attention replacement (create_controller)
        p2p_edit_kind: Literal["replace", "refine", "auto"] = "replace"  # code: replace (word counts must match)
        n_cross_replace: float = 1.0  # P2P default_ window (fraction of steps)
        n_cross_replace_edit: float = 0.4  # P2P window of the edit word
        n_self_replace: float = 0.0  # P2P self-attention window (the code: 0.0)
        blend: bool = True  # feature blending (Eq. 6); false = the unblended three-path edit
        blend_self_attention: bool = True  # the code blends after self-attention too
        # -- real images (sec. 3.4; not wired in the official release) --
        inversion_guidance: float = 3.5  # source-prompt CFG of the inversion (LEDITS++ / DDPM_inversion default)
        inversion_eta: float = 1.0  # edit-friendly DDPM: eta 1

        def __post_init__(self) -> None:
            super().__post_init__()
            check_choice(OWNER, "scheduler", self.scheduler, SCHEDULERS)
            check_choice(OWNER, "source", self.source, SOURCES)
            check_choice(OWNER, "layer_set", self.layer_set, LAYER_SETS)
            check_choice(OWNER, "binarization", self.binarization, BINARIZATIONS)
            check_choice(OWNER, "p2p_edit_kind", self.p2p_edit_kind, P2P_KINDS)
            _check_number(OWNER, "t_e", self.t_e, 0, integer=True)
            _check_number(OWNER, "omega", self.omega, 0.0, inclusive=False)
            _check_number(OWNER, "mask_size", self.mask_size, 1, integer=True)
            _check_number(OWNER, "guidance_real", self.guidance_real, 0.0)
            _check_number(OWNER, "eta", self.eta, 0.0)
            _check_number(OWNER, "inversion_guidance", self.inversion_guidance, 0.0)
            _check_number(OWNER, "inversion_eta", self.inversion_eta, 0.0, inclusive=False)
            for name in ("n_cross_replace", "n_cross_replace_edit", "n_self_replace"):
                v = getattr(self, name)
                _check_number(OWNER, name, v, 0.0)
                if v > 1.0:
                    raise ValueError(f"{OWNER}: '{name}' must be in [0, 1], got {v!r}")
            if self.resolution is None:
                raise ValueError(f"{OWNER}: 'resolution' must be set (SDXL runs at a fixed square size)")

    def __init__(self, params: "PartEdit.Params | None" = None):
        super().__init__(params)
        self._vae: Any = None
        self._vae_revision: str | None = None
        self._vae_fp32: Any = None

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("partedit runs its own three-path loop (edit())")

    # -- weights ---------------------------------------------------------------------------------
    def vae_spec(self) -> ModelSpec | None:
        p = self.params
        if p.backbone == "tiny" or not p.vae:
            return None
        return ModelSpec(model=p.vae, dtype=p.dtype, device=p.device, allow_downloads=p.allow_downloads)

    def tokens_revision(self) -> str:
        p = self.params
        if p.backbone == "tiny" and not p.part_token:
            return f"tiny-random-token-seed{TINY_TOKEN_SEED}"
        if p.part_token and os.path.isfile(os.path.expanduser(p.part_token)):
            st = os.stat(os.path.expanduser(p.part_token))
            return f"file-{st.st_size}-{st.st_mtime_ns}"
        folder = self.token_folder()
        if folder and os.path.isdir(folder):
            return f"folder-{listing_hash(folder)[:16]}"
        return "none"

    def token_folder(self) -> str | None:
        from . import tokens

        folder = self.params.token_dir or getattr(tokens, "DEFAULT_FOLDER", None)
        return os.path.expanduser(str(folder)) if folder else None

    def model_revision(self) -> str | None:
        """Every weight source of an edit: SDXL, the VAE and the part tokens."""
        if self._revision is None:
            sdxl = self._loaded.revision if self._loaded is not None else resolve_revision(self.spec(), None)
            vs = self.vae_spec()
            vae = "pipeline" if vs is None else (self._vae_revision or resolve_revision(vs, None))
            self._revision = f"sdxl={sdxl};vae={vae};tokens={self.tokens_revision()}"
        return self._revision

    def weights_status(self) -> list[tuple[str, str | None]]:
        """SDXL, the VAE and every part token (present / missing, what to provide)."""
        from . import tokens

        p = self.params
        # the base class reads model_revision(), which here joins SDXL, VAE and tokens: SDXL alone
        rev = self._loaded.revision if self._loaded is not None else resolve_revision(self.spec(), None)
        what = f"{p.model} ({RANDOM_WEIGHTS_LABEL})" if p.backbone == "tiny" else p.model
        if rev.startswith("uncached:"):
            out = [(what, f"not in the Hugging Face hub cache {hub_cache_dir(None)}; {PROVIDE_WEIGHTS}")]
        elif rev.startswith("missing-local:"):
            out = [(what, f"the local folder does not exist; {PROVIDE_WEIGHTS}")]
        elif rev.startswith("local-") and not os.path.isfile(os.path.join(os.path.expanduser(p.model),
                                                                          "model_index.json")):
            out = [(what, "the local folder has no model_index.json (not a diffusers pipeline folder)")]
        else:
            out = [(what, None)]
        vs = self.vae_spec()
        if vs is not None:
            rev = resolve_revision(vs, None)
            provide = _PROVIDE_VAE + " (or method.vae=null: the checkpoint's VAE)"
            if rev.startswith("uncached:"):
                out.append((f"VAE {p.vae}", f"not in the Hugging Face hub cache {hub_cache_dir(None)}; {provide}"))
            elif rev.startswith("missing-local:"):
                out.append((f"VAE {p.vae}", f"the local folder does not exist; {provide}"))
            else:
                out.append((f"VAE {p.vae}", None))
        if p.backbone == "tiny" and not p.part_token:
            out.append((f"part token: {TINY_TOKEN_LABEL}", None))
            return out
        if p.part_token:
            try:
                path = tokens.find_part_token(p.part_token, self.token_folder())
                out.append((f"part token {p.part_token} ({path})", None))
            except MissingWeights as e:
                out.append((f"part token {p.part_token}", str(e)))
            return out
        out.extend(tokens.tokens_status(self.token_folder()))
        return out

    def prepare(self) -> None:
        """Load SDXL and the VAE; everything missing is reported at once (the runner's skip
        reason). Part tokens are looked up per sample (their part)."""
        problems: list[str] = []
        try:
            self._loaded = load_pipeline(self.pipeline_class(), self.spec())
        except MissingWeights as e:
            problems.append(f"SDXL: {e}")
        vs = self.vae_spec()
        if vs is not None:
            try:
                self._vae, self._vae_revision = _load_vae(vs, self._loaded.device if self._loaded else None)
            except MissingWeights as e:
                problems.append(f"VAE: {e}\n(for the VAE the parameter is method.vae; method.vae=null uses the "
                                f"checkpoint's own VAE)")
        if problems:
            self._loaded = None
            raise MissingWeights("\n".join(problems))
        assert self._loaded is not None
        counting.watch_pipeline(self._loaded.pipeline)
        if self._vae is not None:  # counted under the pipeline VAE's names (the cost columns)
            counting.watch_module("vae_encode", self._vae.encoder)
            counting.watch_module("vae_decode", self._vae.decoder)
        self._revision = None

    def working_vae(self, pipe: Any) -> Any:
        """The VAE that encodes and decodes: the stand-alone one (``vae``), else the pipeline's; a
        VAE whose config asks for ``force_upcast`` (SDXL's own VAE overflows in fp16) runs as a
        float32 copy, as the SDXL pipeline upcasts it (the copy leaves the shared pipeline alone)."""
        import torch

        vae = self._vae if self._vae is not None else pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            if self._vae_fp32 is None:
                import copy

                self._vae_fp32 = copy.deepcopy(vae).to(torch.float32)
                counting.watch_module("vae_encode", self._vae_fp32.encoder)
                counting.watch_module("vae_decode", self._vae_fp32.decoder)
            return self._vae_fp32
        return vae

    # -- samples -----------------------------------------------------------------------------------
    def prompts(self, sample: Sample) -> tuple[str | None, str | None]:
        """(source prompt, edit prompt) by the rule of the module docstring."""
        meta = sample.meta or {}
        src = meta.get("prompt_original") or sample.source_caption
        subject, edit = meta.get("subject"), meta.get("edit")
        if src and subject and edit and str(subject) in str(src):
            return str(src), str(src).replace(str(subject), str(edit))  # model.py PartEditSDXLModel.edit
        return (str(src) if src else None), (str(sample.target_caption) if sample.target_caption else None)

    def part_name(self, sample: Sample) -> str | None:
        meta = sample.meta or {}
        for v in (self.params.part_token, meta.get("token_cls"), meta.get("part"), sample.part):
            if v:
                return str(v)
        return None

    def is_synthetic(self, sample: Sample) -> bool:
        p = self.params
        if p.source != "auto":
            return p.source == "synthetic"
        meta = sample.meta or {}
        split = str(meta.get("split") or "").lower()
        if split in ("real", "synth", "synthetic"):  # PartEdit-Bench says which split a row is from
            return split != "real"
        return meta.get("seed") is not None

    def check(self, sample: Sample) -> str | None:
        from ..prompt_to_prompt import split_words

        src, edit = self.prompts(sample)
        if not src or not str(src).strip():
            return (f"method '{self.name}' needs a source prompt: sample '{sample.id}' has no meta['prompt_original'] "
                    f"and no source_caption")
        if not edit or not str(edit).strip():
            return (f"method '{self.name}' needs an edit prompt: sample '{sample.id}' has no meta['subject'] + "
                    f"meta['edit'] and no target_caption")
        if self.part_name(sample) is None and not (self.params.backbone == "tiny"):
            return (f"method '{self.name}' needs a part: sample '{sample.id}' has no meta['token_cls'], meta['part'] "
                    f"or part field; set method.part_token")
        if self.params.p2p_replace and self.params.p2p_edit_kind == "replace":
            ns, ne = len(split_words(src)), len(split_words(edit))
            if ns != ne:
                return (f"method '{self.name}' with p2p_edit_kind 'replace' (the code's word swap) needs prompts with "
                        f"the same number of words; sample '{sample.id}' has {ns} in its source prompt and {ne} in "
                        f"its edit prompt (use p2p_edit_kind 'auto' or 'refine', or p2p_replace=false)")
        return None

    def edit_words(self, sample: Sample, src: str, edit: str) -> list[str]:
        from ..prompt_to_prompt import differing_words

        if self.params.edit_word:
            return [self.params.edit_word]
        meta_edit = (sample.meta or {}).get("edit")
        if meta_edit:
            return [str(meta_edit)]
        return differing_words(src, edit)[1]

    def part_token(self, sample: Sample, width: int) -> tuple[Any, str]:
        """(token ``(2, D)``, its label): the sample's token from the folder, or the tiny random one."""
        from . import tokens

        p = self.params
        if p.backbone == "tiny" and not p.part_token:
            return tokens.random_part_token(width, TINY_TOKEN_SEED), TINY_TOKEN_LABEL
        name = self.part_name(sample)
        try:
            path = tokens.find_part_token(name, self.token_folder())
        except MissingWeights as e:
            raise SkipSample(f"method '{self.name}', sample '{sample.id}': part token {name!r}: {e}") from e
        try:
            token = tokens.load_part_token(path, dim=width)
        except (ValueError, FileNotFoundError) as e:
            raise SkipSample(f"method '{self.name}', sample '{sample.id}': part token {name!r}: {e}") from e
        return token, f"{name} ({path})"

    # -- the controller ----------------------------------------------------------------------------
    def build_controller(self, pipe: Any, src: str, edit: str, words: list[str], guided: bool,
                         latent_hw: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        from . import mask as mask_mod
        from .controller import PartEditController, partedit_layout

        p = self.params
        n = int(p.num_inference_steps) + (1 if p.add_extra_step else 0)
        layout = partedit_layout(guided)
        sel = mask_mod.select_layers(pipe.unet, p.layer_set)
        layers = list(sel.indices)
        p2p, pinfo = (self.build_p2p(pipe.tokenizer, src, edit, words, latent_hw) if p.p2p_replace else (None, {}))
        if p2p is not None:
            import torch

            # on the UNet's device and dtype once, not copied from the host at every layer and step
            like = dict(device=pipe.unet.device, dtype=pipe.unet.dtype)
            mapper = np.asarray(p2p.mapper)  # replace: (2, K, K) weights; refine: (2, K) source indices
            p2p.mapper = (torch.as_tensor(mapper, **like) if mapper.ndim == 3
                          else torch.as_tensor(mapper, device=like["device"]).long())
            p2p.token_alpha = torch.as_tensor(p2p.token_alpha, **like)
            if hasattr(p2p, "alphas"):
                p2p.alphas = torch.as_tensor(p2p.alphas, **like)

        def mask_fn(maps: list) -> Any:
            return mask_mod.part_mask(maps, size=int(p.mask_size), omega=float(p.omega), rule=p.binarization)

        ctrl = PartEditController(
            layout, mask_fn, capture_layers=layers, query_sharing=p.query_sharing, p2p=p2p, blend=p.blend,
            blend_kinds=("self", "cross") if p.blend_self_attention else ("cross",), t_e=int(p.t_e),
        )
        info = {"layers": [int(i) for i in layers], "layer_set": p.layer_set, "layer_set_used": sel.used,
                "layer_set_note": sel.note, "controller_steps": n, **pinfo}
        return ctrl, info

    def build_p2p(self, tokenizer: Any, src: str, edit: str, words: list[str],
                  latent_hw: tuple[int, int]) -> tuple[Any, dict[str, Any]]:
        """The Prompt-to-Prompt controller of the code's ``create_controller``: edit 1 = the edit
        row (word-swap mapper source -> edit prompt), edit 2 = the localisation row (identity);
        per-token alphas over ``steps + 1`` controller steps (``get_time_words_attention_alpha``)."""
        from ..diffusion.attention import RefineCrossAttentionController, ReplaceCrossAttentionController
        from ..prompt_to_prompt import (MAX_TOKENS, _full_ids, _token_encoder, refinement_mapper, replacement_mapper,
                                        resolve_kind, word_positions)

        p = self.params
        n = int(p.num_inference_steps)
        k = int(getattr(tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS)
        encode = _token_encoder(tokenizer)
        kind = p.p2p_edit_kind if p.p2p_edit_kind != "auto" else resolve_kind("auto", src, edit)
        # alphas: rows = controller steps (n + 1 as the code's num_steps + 1), edits = (edit, loc)
        alpha = np.ones((n + 1, 2, k), dtype=np.float32)
        alpha[int(p.n_cross_replace * (n + 1)):] = 0.0  # the default_ window (0, n_cross_replace)
        found, missing = {}, []
        for e, prompt in enumerate((edit, src)):
            pos, miss = word_positions(encode, prompt, words, k)
            if e == 0:
                missing = miss
            found[("edit", "localisation")[e]] = pos
            if pos:
                end = int(p.n_cross_replace_edit * (n + 1))
                alpha[:end, e, pos] = 1.0
                alpha[end:, e, pos] = 0.0
        lh, lw = latent_hw
        common = dict(num_steps=n, token_alpha=alpha, self_replace_steps=(0, int(n * p.n_self_replace)),
                      # the code's attn_res = ceil(width / 32) = latent / 4
                      self_max_tokens=max(1, (lh // 4) * (lw // 4)), guidance=("cond", "none"))
        if kind == "replace":
            mapper = np.stack([replacement_mapper(encode, src, edit, k), np.eye(k, dtype=np.float32)])
            ctrl = ReplaceCrossAttentionController(mapper, **common)
        else:
            m, a = refinement_mapper(_full_ids(tokenizer, src, k), _full_ids(tokenizer, edit, k), k)
            ctrl = RefineCrossAttentionController(np.stack([m, np.arange(k)]),
                                                  np.stack([a, np.ones(k, dtype=np.float32)]), **common)
        return ctrl, {"p2p_kind": kind, "p2p_edit_words": list(words), "p2p_edit_word_positions": found["edit"],
                      "p2p_edit_words_missing": missing}

    # -- the edit ---------------------------------------------------------------------------------
    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        from ..diffusion.attention import attention_control
        from . import sampler as smp

        p = self.params
        t0 = time.perf_counter()
        if self._loaded is None:
            self.prepare()
            counting.restart()  # loading is not this edit's cost
            t0 = time.perf_counter()
        loaded = self._loaded
        pipe = loaded.pipeline
        vae = self.working_vae(pipe)
        src_u8 = np.ascontiguousarray(np.asarray(sample.source))
        source_hw = src_u8.shape[:2]
        size = (int(p.resolution), int(p.resolution))
        src_prompt, edit_prompt = self.prompts(sample)
        assert src_prompt and edit_prompt, "check() refuses samples without prompts"
        words = self.edit_words(sample, src_prompt, edit_prompt)
        width = int(pipe.unet.config.cross_attention_dim)
        token, token_label = self.part_token(sample, width)
        synthetic = self.is_synthetic(sample)
        meta_seed = (sample.meta or {}).get("seed")
        run_seed = int(meta_seed) if synthetic and meta_seed is not None else int(seed)
        guidance = float(p.guidance_scale if synthetic else p.guidance_real)
        prep = time.perf_counter() - t0

        t1 = time.perf_counter()
        cond = smp.encode_conditioning(pipe, src_prompt, edit_prompt, token)
        real, inv_s = None, 0.0
        if not synthetic:
            work = np.asarray(to_pil(src_u8, size))
            gen = torch.Generator(pipe.unet.device).manual_seed(run_seed)
            real = smp.invert_real(pipe, vae, work, cond, steps=int(p.num_inference_steps),
                                   guidance_scale=float(p.inversion_guidance), eta=float(p.inversion_eta),
                                   generator=gen)
            inv_s = time.perf_counter() - t1
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        ctrl, cinfo = self.build_controller(pipe, src_prompt, edit_prompt, words, guidance > 1.0,
                                            (size[0] // f, size[1] // f))
        t2 = time.perf_counter()
        with attention_control(pipe.unet, ctrl):
            res = smp.sample(pipe, cond, height=size[0], width=size[1], steps=int(p.num_inference_steps),
                             guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(run_seed),
                             scheduler=p.scheduler, eta=float(p.eta), real=real, add_extra_step=p.add_extra_step,
                             vae=vae, decode_source=False)
        sampling_s = time.perf_counter() - t2
        edited = from_pipeline_output(res.edit.astype(np.float32) / 255.0, source_hw)
        soft = ctrl.used_mask if ctrl.used_mask is not None else ctrl.last_mask
        mask, mask_info = None, {"mask_source": None}
        if soft is not None:
            m = torch.nn.functional.interpolate(soft.float()[None, None].cpu(), size=source_hw, mode="bilinear",
                                                align_corners=False)[0, 0].numpy()
            mask = m > 0
            mask_info = {"mask_source": "last blended step" if ctrl.used_mask is not None else "last computed step",
                         "mask_mean": float(m.mean()), "mask_area": float(mask.mean()),
                         "mask_full_area": float((m >= 1.0).mean())}
        info = {
            **loaded.info(),
            "vae": ((p.vae if self._vae is not None else "pipeline")
                    + (" (fp32 upcast)" if vae is self._vae_fp32 else "")),
            "steps": int(p.num_inference_steps),
            "guidance_scale": guidance,
            "scheduler": "ddpm_edit_friendly (inversion noise)" if real is not None else p.scheduler,
            "source_path": "synthetic" if synthetic else "real (edit-friendly DDPM inversion)",
            "source_seed": run_seed,
            "source_prompt": src_prompt, "edit_prompt": edit_prompt,
            "part_token": token_label,
            "part_token_random": token_label == TINY_TOKEN_LABEL,
            "omega": float(p.omega), "binarization": p.binarization, "mask_size": int(p.mask_size),
            "t_e": int(p.t_e), "add_extra_step": bool(p.add_extra_step),
            "blended_steps": [int(s) for s in ctrl.blended_steps],
            "step_window": [int(ctrl.start_step) + 1, int(p.t_e)],
            "captured_layers": [int(i) for i in ctrl.captured_layers],
            "query_sharing": bool(p.query_sharing), "p2p_replace": bool(p.p2p_replace), "blend": bool(p.blend),
            "blend_self_attention": bool(p.blend_self_attention),
            **cinfo, **mask_info,
            "unet_passes": int(res.unet_passes),
            "auto_params": dict(getattr(p, "auto_resolved", {})),
            "working_size_hw": [size[0], size[1]],
            "seed": int(seed),
            "prep_seconds": prep,
            "stage_seconds": {"inversion": inv_s, "sampling": sampling_s,
                              "mask_aggregation": float(ctrl.aggregation_seconds)},
        }
        return MethodOutput(image=edited, mask=mask, info=info)


_PROVIDE_VAE = PROVIDE_WEIGHTS.replace("method.model", "method.vae")


def _load_vae(spec: ModelSpec, device: str | None) -> tuple[Any, str]:
    """The stand-alone VAE of ``spec`` (the code's fp16-fix VAE), loaded without touching the
    shared pipeline (other SDXL methods keep the checkpoint's VAE). ``MissingWeights`` when absent."""
    from diffusers import AutoencoderKL

    from ..diffusion.loading import _torch_dtype

    allow = downloads_allowed(spec.allow_downloads)
    rev = resolve_revision(spec, None)
    if rev.startswith("missing-local:"):
        raise MissingWeights(f"weights of the VAE '{spec.model}': the local folder does not exist; {_PROVIDE_VAE}")
    if rev.startswith("uncached:") and not allow:
        raise MissingWeights(f"weights of the VAE '{spec.model}' are not in the Hugging Face hub cache "
                             f"{hub_cache_dir(None)}; {_PROVIDE_VAE}")
    try:
        src = os.path.expanduser(spec.model) if spec.is_local else spec.model
        vae = AutoencoderKL.from_pretrained(src, torch_dtype=_torch_dtype(spec.dtype), local_files_only=not allow,
                                            cache_dir=None if spec.is_local else hub_cache_dir(None))
    except OSError as e:
        raise MissingWeights(f"weights of the VAE '{spec.model}' could not be read ({type(e).__name__}: {e}); "
                             f"{_PROVIDE_VAE}") from e
    if device is not None:
        vae = vae.to(device)
    return vae.eval().requires_grad_(False), resolve_revision(spec, None)


__all__ = ["PartEdit"]
