"""``prompt_to_prompt``: Prompt-to-Prompt (Hertz et al., "Prompt-to-Prompt Image Editing with Cross
Attention Control", ICLR 2023) on real images through null-text inversion (Mokady et al., "Null-text
Inversion for Editing Real Images using Guided Diffusion Models", CVPR 2023): CPAM's "P2P+NULL".

Per edit (no diffusers pipeline does this; the loop is written on ``methods/diffusion``):

1. the source, resized to the working size, is encoded with the VAE (posterior mean);
2. DDIM inversion conditioned on the source caption (guidance 1), then, with ``inversion=null_text``,
   null-text optimisation of one unconditional embedding per step
   (:func:`methods.diffusion.inversion.null_text_invert`); ``inversion=ddim`` keeps the plain
   inverted latent and the empty-prompt embedding (cheaper, weaker reconstruction at guidance 7.5);
3. the two branches [source caption, target caption] are sampled side by side from the inverted
   latent in one classifier-free-guided UNet batch
   (:func:`methods.diffusion.inversion.ddim_sample_batch`) while an attention controller edits the
   target branch's conditional half (P2P edits ``attn[h // 2:]``):
   cross-attention of the target replaced by the source's for the first ``cross_replace_steps``
   of the steps, self-attention for the first ``self_replace_steps`` on the layers of at most
   (latent / 2)^2 tokens (32 x 32 of SD's 64 x 64 latent, ``replace_self_attention`` of
   ``null_text_w_ptp.ipynb``);
4. optionally LocalBlend after every step, from ``blend_start`` of the steps on;
5. the target branch is decoded and resized back to the source size.

Edit kinds (``edit_kind``), as ``make_controller`` of the official notebooks builds them:

- ``replace`` (``AttentionReplace``, word swap): the captions must have the same number of words; a
  word-level mapper sends each source word's tokens to the target word's tokens (a word that
  tokenises to a different number of tokens spreads its maps evenly, as ``seq_aligner``'s
  replacement mapper does). A sample whose captions differ in word count is skipped naming the
  counts.
- ``refine`` (``AttentionRefine``): a global alignment of the two token sequences (this module's
  own Needleman-Wunsch, scores match +1 / mismatch -1 / gap 0 as ``seq_aligner.get_refinement_mapper``
  uses); aligned target tokens take the source token's maps, new tokens keep their own.
- ``reweight`` (``AttentionReweight`` on top of the ``auto`` choice): the cross-attention of the
  target tokens of ``reweight_words`` is multiplied by ``reweight_values`` inside the
  cross-replace window. ``reweight_words`` may be given with any kind (the notebook's
  ``eq_params``); ``reweight`` requires them.
- ``auto``: ``replace`` when the captions have the same number of words, else ``refine``.

LocalBlend (``local_blend: true``): the blend words' cross-attention maps (``blend_words``, each
looked up in both captions; empty = the words that differ between the captions), summed over the
steps so far, averaged over the down/up layers at a quarter of the latent size (16 x 16 of 64 x 64,
``LocalBlend`` reads ``down_cross[2:4] + up_cross[:3]``), 3 x 3 max-pooled, resized to the latent,
normalised by the maximum and thresholded at ``blend_threshold``; the target branch keeps the source
latents outside the mask (union of the source and target words' masks).
:class:`methods.diffusion.attention.LocalBlend` does it.

Defaults and sources (google/prompt-to-prompt):
- ``model``: ``CompVis/stable-diffusion-v1-4``, the checkpoint ``null_text_w_ptp.ipynb`` and
  ``prompt-to-prompt_stable.ipynb`` load (set ``model`` for SD 1.5);
- ``num_inference_steps=50`` (``NUM_DDIM_STEPS``), ``guidance_scale=7.5`` (``GUIDANCE_SCALE``),
  DDIM scheduler beta 0.00085-0.012 scaled-linear, ``set_alpha_to_one=False`` (the checkpoint's
  scheduler config, as the notebook builds it), 512 x 512 (``load_512``);
- null-text: ``num_inner_steps=10``, ``early_stop_epsilon=1e-5``, Adam lr ``1e-2 * (1 - i/100)``
  (``NullInversion.invert`` / ``null_optimization``);
- ``cross_replace_steps=0.8`` and ``self_replace_steps=0.5``: the real-image example of
  ``null_text_w_ptp.ipynb`` ("a cat sitting next to a mirror" -> "a tiger ..."; its other examples
  use 0.6 and 0.7; ``prompt-to-prompt_stable.ipynb``'s generated-image examples use 0.4). The
  cross window is ``int(f * (num_steps + 1))`` steps (``ptp_utils.get_time_words_attention_alpha``
  builds ``num_steps + 1`` rows), the self window ``int(f * num_steps)``
  (``AttentionControlEdit``);
- LocalBlend ``threshold 0.3``, ``start_blend=0.2``, 3 x 3 max-pool (``LocalBlend``, ``th=(.3, .3)``,
  ``k = 1``); ``local_blend`` is off by default (the notebooks pass blend words per example).

SDXL (``architecture: sdxl``, set ``model``, e.g. ``stabilityai/stable-diffusion-xl-base-1.0``, and
``resolution: 1024``): PartEdit (Sec. 4.1) compares with the SDXL port of P2P
(RoyiRa/prompt-to-prompt-with-sdxl, ``prompt_to_prompt_pipeline.py`` / ``processors.py``). Here the
same editing runs on an inverted real image: the text conditioning is the SDXL pipeline's own
``encode_prompt`` (the unconditional pair is its zero embedding), with SDXL's micro-conditioning
``time_ids`` (original = target = working size, no crop), through
:class:`methods.diffusion.inversion.PooledTextUNet` (null-text optimises the packed unconditional
embedding, pooled part included). As in that port, the self-attention replacement and LocalBlend use
the layers at ``attn_res = width / 32`` (a quarter of the latent, 32 x 32 at 1024) and LocalBlend reads
down, mid and up layers; its default ``n_self_replace`` is 0.4 (set ``self_replace_steps: 0.4`` to
match it), and the DDIM schedule is built from the checkpoint's (Euler) scheduler config.

Token bookkeeping of this module (word spans, mappers, alignment) is its own code: words are
split on whitespace, compared case-insensitively without surrounding punctuation, and each word's
tokens are the tokenizer's tokens of that word alone (CLIP's BPE tokenises words independently).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Literal, Sequence

import numpy as np

from harness.registry import METHODS
from harness.types import MethodOutput, Sample

from ._diffusion_common import (TINY_STEPS, DiffusionMethod, _check_number, auto_field, check_unit, empty_text_reason,
                                from_pipeline_output)

MAX_TOKENS = 77  # CLIP's context length (P2P's MAX_NUM_WORDS)
SD_DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
EDIT_KINDS = ("auto", "replace", "refine", "reweight")
_PUNCT = ".,;:!?\"'()[]{}"


# --------------------------------------------------------------------------------------------
# Words and tokens
# --------------------------------------------------------------------------------------------
def split_words(text: str) -> list[str]:
    """The caption's words (whitespace split), as written."""
    return str(text).split()


def norm_word(word: str) -> str:
    """A word for comparisons: lower case, surrounding punctuation stripped."""
    return word.strip(_PUNCT).lower()


def word_token_spans(encode: Callable[[str], list[int]], text: str, max_len: int = MAX_TOKENS) -> list[list[int]]:
    """Token positions of every word of ``text`` in its padded token sequence (position 0 is the
    start token). ``encode(word)`` returns a word's token ids without special tokens. Words past
    the context length get empty spans (truncated away, as the text encoder truncates)."""
    spans: list[list[int]] = []
    pos = 1
    for w in split_words(text):
        n = len(encode(w))
        spans.append([p for p in range(pos, pos + n) if p < max_len - 1])
        pos += n
    return spans


def word_positions(encode: Callable[[str], list[int]], text: str, words: Sequence[str],
                   max_len: int = MAX_TOKENS) -> tuple[list[int], list[str]]:
    """Token positions of every occurrence of ``words`` in ``text`` and the words not found."""
    spans = word_token_spans(encode, text, max_len)
    normed = [norm_word(w) for w in split_words(text)]
    positions: list[int] = []
    missing: list[str] = []
    for word in words:
        hits = [i for i, w in enumerate(normed) if w == norm_word(word)]
        if not hits:
            missing.append(word)
        for i in hits:
            positions.extend(spans[i])
    return sorted(set(positions)), missing


def replacement_mapper(encode: Callable[[str], list[int]], source: str, target: str,
                       max_len: int = MAX_TOKENS) -> np.ndarray:
    """``(K, K)`` word-swap mapper: ``target_probs = source_probs @ M``.

    The captions must have the same number of words (ValueError otherwise). Word ``k`` of the
    source maps onto word ``k`` of the target token by token when both have the same token count;
    otherwise every target token receives the mean of the source word's tokens (weights
    ``1 / n_target``, as P2P's ``get_replacement_mapper_``). The start token, the end token and the
    padding follow in order (shifted by the token-count difference); target positions left over at
    the end take the last source position.
    """
    ws, wt = split_words(source), split_words(target)
    if len(ws) != len(wt):
        raise ValueError(
            f"a word swap (replace) needs captions with the same number of words; the source has "
            f"{len(ws)} and the target {len(wt)}"
        )
    ss, st = word_token_spans(encode, source, max_len), word_token_spans(encode, target, max_len)
    m = np.zeros((max_len, max_len), dtype=np.float32)
    m[0, 0] = 1.0
    for a, b in zip(ss, st):
        if not a or not b:
            continue  # truncated away
        if len(a) == len(b):
            m[a, b] = 1.0
        else:
            for j in b:
                m[a, j] = 1.0 / len(b)
    i = 1 + sum(len(a) for a in ss)
    j = 1 + sum(len(b) for b in st)
    while j < max_len:
        m[min(i, max_len - 1), j] = 1.0
        i += 1
        j += 1
    return m


def align_tokens(x: Sequence[int], y: Sequence[int], match: int = 1, mismatch: int = -1,
                 gap: int = 0) -> list[int]:
    """Global alignment (Needleman-Wunsch) of token sequences ``x`` (source) and ``y`` (target).
    Returns, for every position of ``y``, the position in ``x`` of the *equal* token aligned with
    it, or -1 (inserted or mismatched). Ties prefer a match, then a gap in ``x``."""
    n, k = len(x), len(y)
    d = np.zeros((n + 1, k + 1), dtype=np.int64)
    d[1:, 0] = np.arange(1, n + 1) * gap
    d[0, 1:] = np.arange(1, k + 1) * gap
    for i in range(1, n + 1):
        for j in range(1, k + 1):
            s = match if x[i - 1] == y[j - 1] else mismatch
            d[i, j] = max(d[i - 1, j - 1] + s, d[i, j - 1] + gap, d[i - 1, j] + gap)
    out = [-1] * k
    i, j = n, k
    while i > 0 or j > 0:
        if i > 0 and j > 0 and x[i - 1] == y[j - 1] and d[i, j] == d[i - 1, j - 1] + match:
            out[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif j > 0 and d[i, j] == d[i, j - 1] + gap:
            j -= 1
        elif i > 0 and d[i, j] == d[i - 1, j] + gap:
            i -= 1
        else:  # a mismatched pair: no equal token to take the maps from
            i, j = i - 1, j - 1
    return out


def refinement_mapper(ids_source: Sequence[int], ids_target: Sequence[int],
                      max_len: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """``(mapper, alphas)`` of length ``max_len`` for prompt refinement from the two captions'
    token ids (start and end tokens included, no padding): ``mapper[j]`` the source position of
    target token ``j``, ``alphas[j]`` 1 where aligned, 0 for new tokens. Padding positions past
    the target's end map to the source's padding in order (alpha 1)."""
    x, y = list(ids_source)[:max_len], list(ids_target)[:max_len]
    aligned = align_tokens(x, y)
    mapper = np.zeros(max_len, dtype=np.int64)
    alphas = np.ones(max_len, dtype=np.float32)
    for j, i in enumerate(aligned):
        mapper[j] = max(i, 0)
        alphas[j] = 1.0 if i >= 0 else 0.0
    for j in range(len(y), max_len):
        mapper[j] = min(len(x) + (j - len(y)), max_len - 1)
    return mapper, alphas


def differing_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """Words of the source and of the target that the other caption changes: position-wise when
    the word counts match, else the words missing from the other caption."""
    ws, wt = split_words(source), split_words(target)
    if len(ws) == len(wt):
        pairs = [(a, b) for a, b in zip(ws, wt) if norm_word(a) != norm_word(b)]
        return [a for a, _ in pairs], [b for _, b in pairs]
    ns, nt = {norm_word(w) for w in ws}, {norm_word(w) for w in wt}
    return [w for w in ws if norm_word(w) not in nt], [w for w in wt if norm_word(w) not in ns]


def resolve_kind(edit_kind: str, source: str, target: str) -> str:
    """``replace`` or ``refine`` for ``edit_kind`` (``auto``/``reweight`` choose by word count)."""
    if edit_kind in ("replace", "refine"):
        return edit_kind
    return "replace" if len(split_words(source)) == len(split_words(target)) else "refine"


def _token_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    return encode


def _full_ids(tokenizer: Any, text: str, max_len: int) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=max_len).input_ids)


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------
def captions_reason(name: str, sample: Sample, edit_kind: str) -> str | None:
    """Why ``sample`` cannot be edited with Prompt-to-Prompt by method ``name``: a blank caption,
    or (``edit_kind`` ``replace``, a word swap) captions of different word counts; else None."""
    blank = empty_text_reason(name, sample, ("source_caption", "target_caption"))
    if blank:
        return blank
    if edit_kind == "replace":
        ns, nt = len(split_words(sample.source_caption)), len(split_words(sample.target_caption))
        if ns != nt:
            return (
                f"method '{name}' with edit_kind 'replace' (word swap) needs captions with the same number "
                f"of words; sample '{sample.id}' has {ns} in source_caption and {nt} in target_caption "
                f"(use edit_kind 'refine' or 'auto')"
            )
    return None


@METHODS.register("prompt_to_prompt")
class PromptToPrompt(DiffusionMethod):
    """Null-text (or DDIM) inversion of the source, then P2P attention control toward the target."""

    version = "1"
    requires = ("source", "source_caption", "target_caption")
    tiny_kind = "sd15"
    prompt_field = "target_caption"

    @dataclasses.dataclass(frozen=True)
    class Params(DiffusionMethod.Params):
        model: str = SD_DEFAULT_MODEL  # null_text_w_ptp.ipynb's checkpoint
        architecture: Literal["sd", "sdxl"] = "sd"  # sd = SD 1.x/2.x pipeline; sdxl = StableDiffusionXLPipeline
        num_inference_steps: int | Literal["auto"] = auto_field(50, TINY_STEPS)  # NUM_DDIM_STEPS
        guidance_scale: float = 7.5  # GUIDANCE_SCALE
        inversion: Literal["null_text", "ddim"] = "null_text"  # ddim = plain DDIM inversion (cheaper)
        # NullInversion.invert default; tiny: 2 (each is a UNet forward and backward per step)
        num_inner_steps: int | Literal["auto"] = auto_field(10, 2)
        early_stop_epsilon: float = 1e-5  # NullInversion.invert default
        null_text_lr: float = 1e-2  # null_optimization: Adam lr 1e-2 * (1 - i / 100)
        edit_kind: Literal["auto", "replace", "refine", "reweight"] = "auto"
        cross_replace_steps: float = 0.8  # null_text_w_ptp.ipynb {'default_': .8}
        self_replace_steps: float = 0.5  # null_text_w_ptp.ipynb cat -> tiger example
        reweight_words: tuple[str, ...] | None = None  # target-caption words to reweight (eq_params words)
        reweight_values: tuple[float, ...] | None = None  # one scale per word (eq_params values)
        local_blend: bool = False
        blend_words: tuple[str, ...] | None = None  # None = the words that differ between the captions
        blend_threshold: float = 0.3  # LocalBlend th
        blend_start: float = 0.2  # LocalBlend start_blend (fraction of the steps)

        def __post_init__(self) -> None:
            super().__post_init__()
            owner = "prompt_to_prompt"
            if self.architecture not in ("sd", "sdxl"):
                raise ValueError(f"{owner}: 'architecture' must be 'sd' or 'sdxl', got {self.architecture!r}")
            if self.architecture == "sdxl" and self.backbone == "real" and self.model == SD_DEFAULT_MODEL:
                raise ValueError(
                    f"{owner}: 'architecture: sdxl' needs an SDXL 'model' (e.g. {SDXL_MODEL}); "
                    f"the default {SD_DEFAULT_MODEL} is SD 1.4"
                )
            if self.inversion not in ("null_text", "ddim"):
                raise ValueError(f"{owner}: 'inversion' must be 'null_text' or 'ddim', got {self.inversion!r}")
            if self.edit_kind not in EDIT_KINDS:
                raise ValueError(f"{owner}: 'edit_kind' must be one of {list(EDIT_KINDS)}, got {self.edit_kind!r}")
            _check_number(owner, "num_inner_steps", self.num_inner_steps, 1, integer=True)
            _check_number(owner, "early_stop_epsilon", self.early_stop_epsilon, 0.0)
            _check_number(owner, "null_text_lr", self.null_text_lr, 0.0, inclusive=False)
            check_unit(owner, "cross_replace_steps", self.cross_replace_steps)
            check_unit(owner, "self_replace_steps", self.self_replace_steps)
            check_unit(owner, "blend_threshold", self.blend_threshold, high_open=True)
            check_unit(owner, "blend_start", self.blend_start)
            words, values = self.reweight_words or (), self.reweight_values or ()
            if len(words) != len(values):
                raise ValueError(
                    f"{owner}: 'reweight_words' and 'reweight_values' need one value per word, got "
                    f"{len(words)} words and {len(values)} values"
                )
            for w in words:
                if not isinstance(w, str) or not norm_word(w):
                    raise ValueError(f"{owner}: 'reweight_words' must be non-empty words, got {w!r}")
            for v in values:
                _check_number(owner, "reweight_values", v, 0.0)
            if self.edit_kind == "reweight" and not words:
                raise ValueError(f"{owner}: edit_kind 'reweight' needs 'reweight_words' (and 'reweight_values')")
            if self.blend_words and not self.local_blend:
                raise ValueError(f"{owner}: 'blend_words' are used only with 'local_blend: true'")
            for w in self.blend_words or ():
                if not isinstance(w, str) or not norm_word(w):
                    raise ValueError(f"{owner}: 'blend_words' must be non-empty words, got {w!r}")

    def __init__(self, params: "PromptToPrompt.Params | None" = None):
        super().__init__(params)
        self._sample: Sample | None = None
        self._run_info: dict[str, Any] = {}
        # the tiny backbone (and the spec's tiny kind) follows the architecture
        self.tiny_kind = "sdxl" if self.params.architecture == "sdxl" else "sd15"

    @property
    def sdxl(self) -> bool:
        return self.params.architecture == "sdxl"

    @classmethod
    def pipeline_class(cls) -> type:
        """The SD pipeline (``architecture: sd``); :meth:`prepare` loads the SDXL one for ``sdxl``."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def prepare(self) -> None:
        from diffusers import StableDiffusionXLPipeline

        from .diffusion.loading import load_pipeline

        cls = StableDiffusionXLPipeline if self.sdxl else self.pipeline_class()
        self._loaded = load_pipeline(cls, self.spec())

    def check(self, sample: Sample) -> str | None:
        return captions_reason(self.name, sample, self.params.edit_kind)

    # -- controller -----------------------------------------------------------------------
    def build_controller(self, tokenizer: Any, source: str, target: str, latent_hw: tuple[int, int],
                         layout: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(attention controller, LocalBlend or None, info) for one edit."""
        from .diffusion.attention import (AttentionStore, CaptureController, ControllerList, LocalBlend,
                                          RefineCrossAttentionController, ReplaceCrossAttentionController)

        p = self.params
        n = p.num_inference_steps
        max_len = int(getattr(tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS)
        encode = _token_encoder(tokenizer)
        kind = resolve_kind(p.edit_kind, source, target)
        info: dict[str, Any] = {"edit_kind": p.edit_kind, "controller": kind}
        lh, lw = latent_hw
        common = dict(
            num_steps=n,
            # ptp_utils.get_time_words_attention_alpha: int(f * (num_steps + 1)) of num_steps + 1 rows
            cross_replace_steps=(0, int(p.cross_replace_steps * (n + 1))),
            # AttentionControlEdit: int(num_steps * f)
            self_replace_steps=(0, int(n * p.self_replace_steps)),
            # null_text_w_ptp.ipynb replace_self_attention: layers of <= 32**2 tokens of a 64**2 latent;
            # SDXL (RoyiRa/prompt-to-prompt-with-sdxl): <= attn_res**2, attn_res = width / 32 = latent / 4
            self_max_tokens=(lh // 4) * (lw // 4) if self.sdxl else (lh // 2) * (lw // 2),
            layout=layout,
        )
        equalizer = None
        if p.reweight_words:
            eq = np.ones(max_len, dtype=np.float32)
            missing: list[str] = []
            for word, value in zip(p.reweight_words, p.reweight_values):
                pos, miss = word_positions(encode, target, [word], max_len)
                eq[pos] = float(value)
                missing += miss
            equalizer = eq
            info["reweight"] = {w: float(v) for w, v in zip(p.reweight_words, p.reweight_values)}
            info["reweight_words_missing"] = missing
        if kind == "replace":
            mapper = replacement_mapper(encode, source, target, max_len)
            edit = ReplaceCrossAttentionController(mapper, equalizer=equalizer, **common)
        else:
            ids_s, ids_t = _full_ids(tokenizer, source, max_len), _full_ids(tokenizer, target, max_len)
            mapper, alphas = refinement_mapper(ids_s, ids_t, max_len)
            edit = RefineCrossAttentionController(mapper, alphas, equalizer=equalizer, **common)
            info["refine_new_tokens"] = int((alphas[: len(ids_t)] == 0).sum())
        info["cross_replace_window"] = list(edit.cross_window)
        info["self_replace_window"] = list(edit.self_window)
        if not p.local_blend:
            return edit, None, info
        if p.blend_words:
            words_s = words_t = list(p.blend_words)
        else:
            words_s, words_t = differing_words(source, target)
        pos_s, miss_s = word_positions(encode, source, words_s, max_len)
        pos_t, miss_t = word_positions(encode, target, words_t, max_len)
        alpha = np.zeros((2, max_len), dtype=np.float32)
        alpha[0, pos_s] = 1.0
        alpha[1, pos_t] = 1.0
        store = AttentionStore(kinds=("cross",), places=("down", "mid", "up"),
                               max_tokens=max(1, (lh // 2) * (lw // 2)))
        capture = CaptureController(store, rows="cond", layout=layout)
        # SD: down/up maps at 16x16 of 64x64 (LocalBlend's down_cross[2:4] + up_cross[:3]);
        # SDXL implementation: every down/mid/up map at attn_res = latent / 4
        places = ("down", "mid", "up") if self.sdxl else ("down", "up")
        blend = LocalBlend(store, alpha, threshold=p.blend_threshold, start_step=int(p.blend_start * n),
                           places=places)
        info["blend_words_source"] = list(words_s)
        info["blend_words_target"] = list(words_t)
        if p.blend_words:
            info["blend_words_missing"] = sorted(set(miss_s) & set(miss_t))
        # capture after the edit: the stored maps are the edited ones (P2P edits in place)
        return ControllerList([edit, capture], layout=layout), blend, info

    def call_pipeline(self, pipe: Any, image: Any, prompt: str, generator: Any) -> Any:
        """Run the whole edit on the resized PIL ``image`` (source caption from the sample being
        edited); returns an object with ``images`` (float ``1 x H x W x 3`` in [0, 1])."""
        assert self._sample is not None, "call_pipeline runs inside edit()"
        arr = np.asarray(image)
        edited, self._run_info = self._run(pipe, arr, str(self._sample.source_caption), prompt)
        return _Output(images=edited[None].astype(np.float32) / 255.0)

    def _run(self, pipe: Any, image: np.ndarray, source: str, target: str) -> tuple[np.ndarray, dict[str, Any]]:
        import torch

        from .diffusion.attention import BatchLayout, attention_control
        from .diffusion.inversion import (PooledTextUNet, ddim_invert, ddim_sample_batch, decode_latents,
                                          encode_image, encode_prompt, encode_prompt_sdxl, make_schedule,
                                          null_text_invert)

        p = self.params
        n = p.num_inference_steps
        pipe.unet.requires_grad_(False)  # only the null-text embedding is optimised
        # SDXL ships an Euler scheduler: the DDIM schedule is built from its config (same betas)
        sched = make_schedule(pipe.scheduler, n)
        info: dict[str, Any] = {"inversion": p.inversion, "architecture": p.architecture}
        t0 = time.perf_counter()
        z0 = encode_image(pipe, image)
        if self.sdxl:
            emb, pooled, u_emb, u_pooled = encode_prompt_sdxl(pipe, [source, target])
            conds = PooledTextUNet.pack(emb, pooled).to(z0)
            uncond = PooledTextUNet.pack(u_emb, u_pooled).to(z0)
            hw = (int(image.shape[0]), int(image.shape[1]))  # micro-conditioning: original = target size, no crop
            time_ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=z0.dtype,
                                              text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            unet = PooledTextUNet(pipe.unet, time_ids.to(z0.device), emb.shape[1], pooled.shape[-1])
        else:
            unet = pipe.unet
            conds = encode_prompt(pipe, [source, target]).to(z0)
            uncond = encode_prompt(pipe, "").to(z0)
        if p.inversion == "null_text":
            z_T, uncond_steps, _ = null_text_invert(
                unet, sched, z0, conds[:1], uncond, n, guidance_scale=p.guidance_scale,
                inner_steps=p.num_inner_steps, lr=p.null_text_lr, early_stop=p.early_stop_epsilon,
            )
            info.update(num_inner_steps=int(p.num_inner_steps), early_stop_epsilon=float(p.early_stop_epsilon),
                        null_text_lr=float(p.null_text_lr))
        else:
            z_T, uncond_steps = ddim_invert(unet, sched, z0, conds[:1], n)[-1], None
        info["inversion_seconds"] = time.perf_counter() - t0
        guided = p.guidance_scale != 1.0
        layout = BatchLayout.cfg(2) if guided else BatchLayout.plain(2)
        controller, blend, cinfo = self.build_controller(pipe.tokenizer, source, target, tuple(z0.shape[-2:]), layout)
        info.update(cinfo)
        t1 = time.perf_counter()
        with attention_control(pipe.unet, controller):
            latents = ddim_sample_batch(unet, sched, z_T, conds, n, guidance_scale=p.guidance_scale,
                                        uncond=uncond, uncond_per_step=uncond_steps, callback=blend)
        info["editing_seconds"] = time.perf_counter() - t1
        if blend is not None:
            info["blend_grid_hw"] = list(blend.used_grid) if blend.used_grid else None
            if blend.last_mask is not None:
                info["blend_mask_fraction"] = float(blend.last_mask[1].float().mean())
        with torch.no_grad():
            edited = decode_latents(pipe, latents[1:2])
        return edited, info

    def edit(self, sample: Sample, seed: int) -> MethodOutput:
        import torch

        start = self.begin_edit(sample, seed)
        prep = time.perf_counter() - start.t0
        # Deterministic method (DDIM, eta 0): the seed is recorded, and seeds torch for safety.
        torch.manual_seed(int(seed))
        self._sample, self._run_info = sample, {}
        try:
            out = self.call_pipeline(start.loaded.pipeline, start.image, str(sample.target_caption), None)
            run_info = self._run_info
        finally:
            self._sample, self._run_info = None, {}
        p = self.params
        info = self.edit_info(
            start, seed, prep,
            cross_replace_steps=float(p.cross_replace_steps), self_replace_steps=float(p.self_replace_steps),
            local_blend=bool(p.local_blend), **run_info, prompt_field=self.prompt_field,
            prompt=str(sample.target_caption), source_caption=str(sample.source_caption),
        )
        return MethodOutput(image=from_pipeline_output(out.images, start.source_hw), info=info)


@dataclasses.dataclass
class _Output:
    images: Any


__all__ = [
    "PromptToPrompt",
    "align_tokens",
    "differing_words",
    "refinement_mapper",
    "replacement_mapper",
    "resolve_kind",
    "word_positions",
    "word_token_spans",
]
