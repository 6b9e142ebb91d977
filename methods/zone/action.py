"""ZONE's action: add, change or remove (paper sec. 4.2 and appendix B; code ``msk_from_attn.py``
``MLPClassifier`` / ``cls_predict`` / ``action_classify``), and how the adapter decides it.

The classifier. An MLP ``Linear(768, 128) -> ReLU -> Linear(128, 3)`` applied to every token
of IP2P's CLIP text-encoder last hidden state (the instruction tokenised to 77 tokens, padded /
truncated, the attention mask passed to the encoder as the code does), giving (77, 3) logits.
Labels: 0 = CHANGE, 1 = ADD, 2 = REMOVE (``tensor2label``). The official checkpoint
(``ckpts/action_classifier.pth``, in the ZONE repository) is a plain state dict with the keys
``fc1.weight`` (128, 768), ``fc1.bias`` (128), ``fc2.weight`` (3, 128), ``fc2.bias`` (3).

Label rules (``classifier_quirk``):

- ``code`` (the released code): ``torch.max(logits, dim=tokens)`` returns, per class, the *token
  index* where that class's logit peaks; ``tensor2label`` then takes the argmax over the three
  classes of those indices. So the label is the class whose peak comes at the latest token
  (ties: the lowest class index, as ``argmax``).
- ``argmax``: the plain reading: the class with the highest logit over all tokens.

Resolution (``action``): ``add`` / ``change`` / ``remove`` force it; ``auto`` uses the classifier
when a checkpoint is given (``classifier_checkpoint``), else the sample's category
(:data:`CATEGORY_ACTIONS`), else the keyword rule :func:`keyword_action` on the instruction.
Every edit records the action and which source decided it.

torch is imported lazily.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any

ACTIONS = ("change", "add", "remove")  # the code's label order: 0 = CHANGE, 1 = ADD, 2 = REMOVE
QUIRKS = ("code", "argmax")
#: The official MLP's sizes (appendix B) and the code's tokenisation length.
HIDDEN_SIZE = 128
NUM_CLASSES = 3
MAX_TOKENS = 77
STATE_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

#: Sample category -> action. ``add`` and ``remove`` are themselves; every ``change_*`` category
#: (object, colour, material, background, content, pose, style) changes an existing region, the
#: paper's "change" ("change the style (texture) of an existing object or replace the object",
#: sec. 4). ``move``, ``paste``, ``face_drag`` and ``random`` are none of ZONE's three actions:
#: they fall through to the keyword rule. ``change`` itself is ZONE's test set's own category (its
#: loader's ``extra_categories``).
CATEGORY_ACTIONS = {
    "add": "add",
    "remove": "remove",
    "change": "change",
    "change_object": "change",
    "change_color": "change",
    "change_material": "change",
    "change_background": "change",
    "change_content": "change",
    "change_pose": "change",
    "change_style": "change",
}

# The keyword rule (ours: ZONE has no such rule; it stands in when neither a classifier nor a
# category decides). Verbs and phrases of the paper's examples and its classifier training
# sentences (appendix C.2, Table 3: "remove", "take away", "delete", "erase", "get rid of", "get off
# his tie"; "put", "attach", "include", "give", "add").
REMOVE_WORDS = ("remove", "removes", "removing", "delete", "erase", "eliminate", "get rid of", "take away",
                "take out", "take off", "get off", "without", "no longer", "rid of")
ADD_WORDS = ("add", "adds", "adding", "put", "place", "include", "attach", "insert", "give", "wear",
             "wearing", "draw", "hold", "holding")


def _pattern(words: tuple[str, ...]) -> "re.Pattern[str]":
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


_REMOVE, _ADD = _pattern(REMOVE_WORDS), _pattern(ADD_WORDS)


def keyword_action(instruction: str) -> str:
    """The action whose keyword occurs first in ``instruction`` (whole words, any case; a remove
    keyword wins a tie at the same position); ``change`` when none occurs ("turn the cat into a
    dog", "make it red", "replace the chair with a couch")."""
    hits = []
    m = _REMOVE.search(instruction)
    if m:
        hits.append((m.start(), 0, "remove"))
    m = _ADD.search(instruction)
    if m:
        hits.append((m.start(), 1, "add"))
    return min(hits)[2] if hits else "change"


def label_from_logits(logits: Any, quirk: str = "code") -> int:
    """The class index (0 change, 1 add, 2 remove) of per-token ``logits`` of shape
    (tokens, 3) under ``quirk`` (see the module docstring)."""
    import numpy as np

    arr = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != NUM_CLASSES:
        raise ValueError(f"zone action classifier: logits must be (tokens, {NUM_CLASSES}), got {arr.shape}")
    if quirk == "code":
        peak_token = arr.argmax(axis=0)  # per class: the token index of its peak (torch.max(.., 1)[1])
        return int(peak_token.argmax())  # tensor2label: argmax over the three indices
    if quirk == "argmax":
        return int(np.unravel_index(arr.argmax(), arr.shape)[1])
    raise ValueError(f"zone: 'classifier_quirk' must be one of {list(QUIRKS)}, got {quirk!r}")


@functools.lru_cache(maxsize=None)
def _mlp_class() -> type:
    import torch

    class MLPClassifier(torch.nn.Module):
        """Linear -> ReLU -> Linear, attribute names as the official state dict's keys."""

        def __init__(self, input_size: int, hidden_size: int = HIDDEN_SIZE, num_classes: int = NUM_CLASSES):
            super().__init__()
            self.fc1 = torch.nn.Linear(input_size, hidden_size)
            self.relu = torch.nn.ReLU()
            self.fc2 = torch.nn.Linear(hidden_size, num_classes)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.fc2(self.relu(self.fc1(x)))

    return MLPClassifier


def build_mlp(input_size: int) -> Any:
    """A fresh (randomly initialised) action MLP for text states of width ``input_size``."""
    return _mlp_class()(input_size).eval().requires_grad_(False)


def random_mlp(input_size: int, seed: int) -> Any:
    """A random-weight MLP (smoke runs with the tiny backbone), initialised under ``seed``
    without touching the global random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_mlp(input_size)


class ClassifierError(ValueError):
    """A classifier checkpoint that exists but is not the official MLP's state dict."""


def load_classifier(path: str | os.PathLike, input_size: int) -> Any:
    """Load the official checkpoint at ``path`` (a state dict with :data:`STATE_KEYS`) into an
    MLP over text states of width ``input_size``. A file that is not such a state dict, or whose
    input width is not ``input_size`` (e.g. the 768-wide official file with a tiny text
    encoder), raises :class:`ClassifierError` naming the file and what differs. Checking that the
    file exists is the caller's (it raises ``MissingWeights``)."""
    import torch

    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors: not a torch file
        raise ClassifierError(f"zone action classifier checkpoint {path}: not a torch state dict "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or sorted(state) != sorted(STATE_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ClassifierError(f"zone action classifier checkpoint {path}: expected the keys {list(STATE_KEYS)} "
                              f"of the official MLP (msk_from_attn.MLPClassifier), got {keys}")
    want = {"fc1.weight": (HIDDEN_SIZE, input_size), "fc1.bias": (HIDDEN_SIZE,),
            "fc2.weight": (NUM_CLASSES, HIDDEN_SIZE), "fc2.bias": (NUM_CLASSES,)}
    for k, shape in want.items():
        got = tuple(state[k].shape)
        if got != shape:
            raise ClassifierError(f"zone action classifier checkpoint {path}: '{k}' has shape {list(got)}, "
                                  f"expected {list(shape)} (an MLP over {input_size}-wide text-encoder states)")
    mlp = build_mlp(input_size)
    mlp.load_state_dict(state)
    return mlp


def token_states(tokenizer: Any, text_encoder: Any, instruction: str) -> Any:
    """IP2P's text-encoder last hidden state of ``instruction``, shape (77, width): tokenised
    with ``padding='max_length', truncation=True, max_length=77`` and encoded with its attention
    mask, as ``cls_predict`` does (the mask changes the padding tokens' states, which the
    ``code`` label rule reads)."""
    import torch

    enc = tokenizer(instruction, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    device = text_encoder.device
    with torch.inference_mode():
        states = text_encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device))[0]
    return states[0]


def classify(mlp: Any, tokenizer: Any, text_encoder: Any, instruction: str, quirk: str = "code") -> tuple[str, Any]:
    """(action, logits (77, 3)) of ``instruction`` by ``mlp`` over IP2P's text states."""
    import torch

    states = token_states(tokenizer, text_encoder, instruction)
    mlp = mlp.to(device=states.device, dtype=states.dtype)
    with torch.inference_mode():
        logits = mlp(states)
    return ACTIONS[label_from_logits(logits, quirk)], logits


def resolve_action(forced: str, instruction: str, category: str | None,
                   classifier_action: str | None) -> tuple[str, str]:
    """(action, source) by the resolution order of the module docstring. ``forced`` is the
    ``action`` parameter; ``classifier_action`` the classifier's label (None without a
    classifier). ``source`` is ``param``, ``classifier``, ``category`` or ``keyword``."""
    if forced != "auto":
        if forced not in ACTIONS:
            raise ValueError(f"zone: 'action' must be auto or one of {list(ACTIONS)}, got {forced!r}")
        return forced, "param"
    if classifier_action is not None:
        return classifier_action, "classifier"
    if category is not None and category in CATEGORY_ACTIONS:
        return CATEGORY_ACTIONS[category], "category"
    return keyword_action(instruction), "keyword"
