"""PartEdit's learned part tokens: the released set, loading, saving, status.

A part token is a ``(2, D)`` text embedding (``D`` = 2048 for SDXL: the two text encoders'
hidden states concatenated): row 0 the background token, row 1 the part token (the code's
order; the paper's Sec. 3.1 calls the part token "the first"). The authors publish nine of them in
the Hugging Face dataset ``Aleksandar/PartEdit-extra`` (``pt/<name>.pt``, also as
``.safetensors`` with the key ``embedding``); the official ``process_embeddings`` reads a
``.pt`` with ``torch.load`` (a bare tensor) and a ``.safetensors`` with ``load_file(...)["embedding"]``.
Files written by the training code (``save_opt_embedding``) are bare tensors as well; a dict
holding one ``(2, D)`` tensor under ``embedding`` is accepted too.

``.pt`` files are read with ``torch.load(weights_only=True)``: only tensors and plain containers
are unpickled, never arbitrary objects.

No torch import at module import time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..diffusion.loading import MissingWeights

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "OFFICIAL_KEYS",
    "PART_TOKENS",
    "TOKEN_DATASET",
    "TOKEN_EXTENSIONS",
    "TOKEN_PARAM",
    "find_part_token",
    "load_part_token",
    "random_part_token",
    "save_part_token",
    "tokens_status",
]

#: Where the released tokens are published (Hugging Face dataset, files under ``pt/``).
TOKEN_DATASET = "Aleksandar/PartEdit-extra"
#: The adapter parameter that names the token folder (P2's ``conf/method/partedit.yaml``).
TOKEN_PARAM = "method.token_dir"
#: Token file extensions, in lookup order.
TOKEN_EXTENSIONS = (".pt", ".safetensors")

#: The released tokens (``model.py``'s ``available_pts``) and the part each localises, as the
#: comments next to each file name in ``model.py`` describe it. Note: the official
#: ``PART_TOKENS`` dict maps the key ``"quadruped_head"`` to ``partimage_biped_head.pt`` and
#: ``"biped_head"`` to ``partimage_quadruped_head.pt`` (indices 3 and 8 swapped relative to the
#: file names); we key by file name, so a run names the file it used.
PART_TOKENS: dict[str, str] = {
    "torso_custom": "human torso (custom annotations; preferred over partimage_human_torso)",
    "chair_custom": "chair seat (custom annotations)",
    "carhood_custom": "car hood (custom annotations)",
    "partimage_biped_head": "biped head (PartImageNet; 'essentially monkeys')",
    "partimage_carbody": "car body (PartImageNet; everything except the wheels)",
    "partimage_human_hair": "human hair (PASCAL-Part)",
    "partimage_human_head": "human head (PASCAL-Part; 'essentially faces')",
    "partimage_human_torso": "human torso (PASCAL-Part)",
    "partimage_quadruped_head": "quadruped head (PartImageNet; animals on four legs)",
}


def _check_token(t: Any, path: Path, dim: int | None) -> "torch.Tensor":
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"part token file {path}: expected a tensor, found {type(t).__name__}")
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]  # (1, 2, D): the batch form process_embeddings builds
    if t.ndim != 2 or t.shape[0] != 2:
        raise ValueError(
            f"part token file {path}: expected shape (2, D) (background, part), got {tuple(t.shape)}"
        )
    if dim is not None and t.shape[1] != dim:
        raise ValueError(
            f"part token file {path}: embedding width {t.shape[1]} does not match the text width {dim} "
            "(SDXL: 2048; a token trained on another model?)"
        )
    if not t.is_floating_point():
        raise ValueError(f"part token file {path}: expected a floating-point tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"part token file {path}: contains non-finite values")
    return t.detach().to(torch.float32).contiguous()


def load_part_token(path: str | os.PathLike, *, dim: int | None = None) -> "torch.Tensor":
    """The ``(2, D)`` float32 token (row 0 background, row 1 part) in ``path``.

    ``.pt``: a tensor, or a dict with one entry ``embedding`` (read with
    ``torch.load(weights_only=True)``); ``.safetensors``: the key ``embedding``. ``dim``, when
    given, is the required width (the text encoder's). Errors name the file: a missing file is
    ``FileNotFoundError``, a wrong format / key / shape / type ``ValueError``.
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"part token file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"part token file {p}: not a readable safetensors file ({err})") from err
        if "embedding" not in data:
            raise ValueError(f"part token file {p}: no key 'embedding' (keys: {sorted(data)})")
        return _check_token(data["embedding"], p, dim)
    if suffix == ".pt":
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors, refused globals, truncated files
            raise ValueError(
                f"part token file {p}: not a tensor file torch.load(weights_only=True) can read ({err})") from err
        if isinstance(obj, dict):
            if "embedding" not in obj:
                raise ValueError(
                    f"part token file {p}: a dict without the key 'embedding' (keys: {sorted(map(str, obj))})")
            obj = obj["embedding"]
        return _check_token(obj, p, dim)
    raise ValueError(f"part token file {p}: unknown extension {p.suffix!r} (expected .pt or .safetensors)")


def save_part_token(token: "torch.Tensor", path: str | os.PathLike) -> Path:
    """Write a ``(2, D)`` token to ``path`` (``.pt``: a bare tensor, as the released files;
    ``.safetensors``: key ``embedding``), creating the folder. Returns the path."""
    import torch

    p = Path(path).expanduser()
    t = _check_token(token, p, None).cpu()
    p.parent.mkdir(parents=True, exist_ok=True)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"embedding": t}, str(p))
    elif suffix == ".pt":
        torch.save(t, str(p))
    else:
        raise ValueError(f"part token file {p}: unknown extension {p.suffix!r} (expected .pt or .safetensors)")
    return p


def _provide(name: str, folder: Path | None) -> str:
    where = f"{folder}" if folder is not None else "a local folder"
    return (
        f"download pt/{name}.pt from the Hugging Face dataset {TOKEN_DATASET} into {where} "
        f"(or train one: python -m methods.partedit.train) and set {TOKEN_PARAM} to that folder, "
        "or pass the token as a file path"
    )


#: The official demo's part keys (``model.py`` ``PART_TOKENS``; PartEdit-Bench v1.1's ``token_cls``
#: column uses them) -> the token file each loads there. Kept as the released code has it,
#: including its swap of the two head tokens (see :data:`PART_TOKENS`): a key resolves to the file
#: the official demo would load, and the edit's info names that file.
OFFICIAL_KEYS: dict[str, str] = {
    "human_head": "partimage_human_head",
    "human_hair": "partimage_human_hair",
    "human_torso_custom": "torso_custom",
    "chair_custom": "chair_custom",
    "carhood_custom": "carhood_custom",
    "carbody": "partimage_carbody",
    "biped_head": "partimage_quadruped_head",
    "quadruped_head": "partimage_biped_head",
    "human_torso": "partimage_human_torso",
}


def find_part_token(name_or_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """The token file for ``name_or_path``.

    A path to an existing file (or any value with a ``.pt`` / ``.safetensors`` extension or a
    path separator) is taken as a path. A name (``partimage_human_head``) is looked up in
    ``folder`` as ``<name>.pt``, ``<name>.safetensors``, ``pt/<name>.pt`` or
    ``safetensors/<name>.safetensors`` (the dataset's layout); an official demo key
    (``human_head``, :data:`OFFICIAL_KEYS`) is first turned into its file name. Raises :class:`MissingWeights`
    naming the token, the places looked in, where the token is published and the parameter to set.
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise ValueError("part token: empty name")
    p = Path(raw).expanduser()
    looks_like_path = p.suffix.lower() in TOKEN_EXTENSIONS or os.sep in raw or "/" in raw
    if looks_like_path or p.is_file():
        if p.is_file():
            return p
        raise MissingWeights(f"part token file {p} does not exist; {_provide(p.stem, p.parent)}")
    if raw not in PART_TOKENS and raw in OFFICIAL_KEYS:
        raw = OFFICIAL_KEYS[raw]  # the demo's key (token_cls) -> the file it loads
    base = Path(folder).expanduser() if folder not in (None, "") else None
    tried: list[Path] = []
    if base is not None:
        for cand in (base / f"{raw}.pt", base / f"{raw}.safetensors",
                     base / "pt" / f"{raw}.pt", base / "safetensors" / f"{raw}.safetensors"):
            tried.append(cand)
            if cand.is_file():
                return cand
    known = "" if raw in PART_TOKENS else f" ('{raw}' is not one of the released tokens: {', '.join(PART_TOKENS)})"
    looked = f"looked for {', '.join(str(t) for t in tried)}" if tried else f"no token folder is set ({TOKEN_PARAM})"
    raise MissingWeights(f"part token '{raw}' not found: {looked}{known}; {_provide(raw, base)}")


def tokens_status(folder: str | os.PathLike | None) -> list[tuple[str, str | None]]:
    """Each released token: ``(label, None)`` when its file is in ``folder``, else
    ``(label, how to provide it)`` (for ``edit-harness weights``)."""
    out: list[tuple[str, str | None]] = []
    for name, part in PART_TOKENS.items():
        label = f"part token {name} ({part})"
        try:
            path = find_part_token(name, folder)
        except MissingWeights as err:
            out.append((label, str(err)))
        else:
            out.append((f"{label}: {path}", None))
    return out


def random_part_token(dim: int, seed: int) -> "torch.Tensor":
    """A seeded ``(2, dim)`` standard-normal token (the training code's random init,
    ``torch.randn_like``; tiny mode's stand-in token — the caller labels it as random).
    Drawn from a private CPU generator: the global RNG is untouched."""
    import torch

    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(2, dim, generator=g, dtype=torch.float32)
