"""``report/index.html``: a self-contained HTML view of a run's report.

One file that opens from disk with no server and no network: every table the Markdown report
holds (``table.md``, ``table_by_category.md``, the other ``.md`` files the report wrote, then
``edits.md`` with the failed and skipped edits and their reasons), each sortable by clicking a
header (a few lines of inline JavaScript, no external script), the plots (relative links to the
PNGs beside ``index.html``), a qualitative grid per sample (source, the dataset's mask and
ground truth where it has them, then for every method and parameter point its edit, its mask and
a difference map), and each job's ``manifest.json`` in a collapsible ``<details>``.

Grid images are thumbnails embedded as data URIs (at most :data:`THUMB_MAX_SIDE` px a side;
photos and difference maps JPEG, masks PNG), so the file can be copied or mailed alone. A large
run is sampled: at most :data:`GRID_MAX_SAMPLES` samples and :data:`GRID_MAX_IMAGES` images,
chosen at evenly spaced positions of the (dataset, sample id) order, and the page says how many
were left out. Sources come from the dataset named in each job's manifest; a dataset that cannot
be opened when the report is built leaves the grid with the edits only, and the page says why.

Every text that comes from data (sample ids, reasons, captions, parameters) is HTML-escaped. The
output is deterministic: the same run gives the same bytes (no timestamps, sorted order).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from .aggregate import _as_dirs, find_jobs, format_params, params_sort_key
from .fileio import save_bytes
from .types import EditStatus

HTML_FILE = "index.html"
#: The grid shows at most this many samples ...
GRID_MAX_SAMPLES = 50
#: ... and at most this many images in all (source, ground truth, masks, edits, difference
#: maps), so that a run with many methods shows fewer samples and the file stays a few MB.
GRID_MAX_IMAGES = 600
#: Thumbnails' longest side in pixels (smaller images are kept at their size).
THUMB_MAX_SIDE = 256
#: Difference maps: mean over R, G, B of |edit - reference| on the 0-255 scale, times this gain,
#: clipped at 255 (a fixed gain, not a per-image stretch, so that maps compare across methods).
DIFF_GAIN = 4
JPEG_QUALITY = 85
#: What the difference map compares the edit with: the source, or the dataset's ground truth
#: (``target``; a sample without one falls back to the source, and says so).
DIFF_AGAINST = ("source", "target")
#: Markdown files rendered first, in this order; other ``.md`` files of the report follow, sorted,
#: and ``edits.md`` (status, failures and skips) comes last, in its own section.
_TABLE_FILES = ("table.md", "table_by_category.md")
_EDITS_FILE = "edits.md"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


# ----------------------------------------------------------------------------------------------
# Markdown -> HTML, for the subset harness/report.py writes
# ----------------------------------------------------------------------------------------------
# Written by hand: no Markdown library is among the dependencies, and a general one would read
# Markdown syntax inside user data (an underscore in a sample id as emphasis, raw HTML in a
# reason). The report's Markdown is a fixed subset: headings, "- " lists (nested by two spaces),
# pipe tables whose cells are escaped with report.md_escape ("\|", "\\"), a cell that is wholly
# **bold** or <u>underlined</u> (best / second-best marks), `code` spans, and _italic_ lines.
def split_row(line: str) -> list[str]:
    """The cells of one Markdown pipe-table row, undoing ``report.md_escape``."""
    body = line.strip()
    if body.startswith("|"):
        body = body[1:]
    cells, cur, i = [], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] in "\\|":
            cur.append(body[i + 1])
            i += 2
            continue
        if ch == "|":
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    rest = "".join(cur).strip()
    if rest:
        cells.append(rest)
    return cells


def markdown_tables(text: str) -> list[dict[str, Any]]:
    """Every pipe table of a Markdown text: ``{"heading": last heading above it, "header":
    [cells], "rows": [[cells]]}``, cells as written (marks included, escapes undone)."""
    out: list[dict[str, Any]] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("#"):
            heading = ln.lstrip("#").strip()
        if _is_table_start(lines, i):
            header = split_row(ln)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            out.append({"heading": heading, "header": header, "rows": rows})
            continue
        i += 1
    return out


def _is_table_start(lines: Sequence[str], i: int) -> bool:
    return (lines[i].startswith("|") and i + 1 < len(lines)
            and re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", lines[i + 1].strip()) is not None)


_CODE = re.compile(r"`([^`]+)`")
_MARKED = (("**", "**", "strong"), ("<u>", "</u>", "u"))


def inline(text: str) -> str:
    """Escaped text with `code` spans as <code>."""
    parts = _CODE.split(text)
    return "".join(f"<code>{esc(p)}</code>" if k % 2 else esc(p) for k, p in enumerate(parts))


def _cell(text: str) -> str:
    for start, end, tag in _MARKED:
        if len(text) > len(start) + len(end) and text.startswith(start) and text.endswith(end):
            return f"<{tag}>{inline(text[len(start):-len(end)])}</{tag}>"
    return inline(text)


def _table_html(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    def td(tag: str, k: int, s: str) -> str:
        cls = ' class="num"' if k < len(align) and align[k].endswith(":") else ""
        return f"<{tag}{cls}>{s}</{tag}>"

    out = ['<table class="sortable">', "<thead><tr>"
           + "".join(td("th", k, inline(h)) for k, h in enumerate(header)) + "</tr></thead>", "<tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(td("td", k, _cell(c)) for k, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return out


def markdown_to_html(text: str, level: int = 2) -> str:
    """HTML of a Markdown text written by harness/report.py; ``# `` becomes ``<h{level}>``. The
    list right below a top heading (a table's caption: protocol, weights, samples, marks) is
    folded into a ``<details>`` so that the table comes first; tables scroll sideways."""
    out: list[str] = []
    lines = text.splitlines()
    depth = 0  # open <ul> levels
    caption = False  # the list being written is a caption (folded)
    after_title = False  # the last non-blank line was a top heading

    def close_lists(to: int = 0) -> None:
        nonlocal depth, caption
        while depth > to:
            out.append("</li></ul>")
            depth -= 1
        if depth == 0 and caption:
            out.append("</details>")
            caption = False

    i = 0
    while i < len(lines):
        ln = lines[i]
        m = re.match(r"^( *)- (.*)$", ln)
        if m:
            d = len(m.group(1)) // 2 + 1
            if depth == 0 and after_title:
                out.append('<details class="caption"><summary>Caption: runs, protocol, weights, samples, '
                           "conventions, marks</summary>")
                caption = True
            if d > depth:
                while depth < d:
                    out.append("<ul><li>")
                    depth += 1
            else:
                close_lists(d)
                out.append("</li><li>")
            out.append(inline(m.group(2)))
            after_title = False
            i += 1
            continue
        close_lists()
        if not ln.strip():
            i += 1
            continue
        after_title = False
        if _is_table_start(lines, i):
            header = split_row(ln)
            align = split_row(lines[i + 1])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            out += ['<div class="scroll">', *_table_html(header, rows, align), "</div>"]
            continue
        h = re.match(r"^(#+) (.*)$", ln)
        if h:
            lv = min(6, level + len(h.group(1)) - 1)
            out.append(f"<h{lv}>{inline(h.group(2))}</h{lv}>")
            after_title = len(h.group(1)) == 1
        else:
            s = ln.strip()
            if len(s) > 2 and s.startswith("_") and s.endswith("_"):
                out.append(f"<p><em>{inline(s[1:-1])}</em></p>")
            else:
                out.append(f"<p>{inline(s)}</p>")
        i += 1
    close_lists()
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def thumbnail(img: Image.Image, max_side: int = THUMB_MAX_SIDE, mask: bool = False) -> Image.Image:
    """A copy no larger than ``max_side`` a side, aspect kept (Pillow's ``thumbnail``); masks
    with a box filter (edge pixels become grey levels, never a shifted edge)."""
    img = img.copy()
    img.thumbnail((max_side, max_side), Image.Resampling.BOX if mask else Image.Resampling.LANCZOS)
    return img


def data_uri(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def diff_map(edit: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The visible difference map of two RGB uint8 images, uint8 HxW at the edit's size:
    mean over channels of |edit - reference| x :data:`DIFF_GAIN`, clipped at 255. The reference
    is resized (bicubic) to the edit's size when they differ."""
    if reference.shape[:2] != edit.shape[:2]:
        reference = np.asarray(Image.fromarray(reference).resize((edit.shape[1], edit.shape[0]),
                                                                  Image.Resampling.BICUBIC))
    d = np.abs(edit.astype(np.int16) - reference.astype(np.int16)).mean(axis=-1)
    return np.clip(np.rint(d * DIFF_GAIN), 0, 255).astype(np.uint8)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def _mask_img(m: np.ndarray) -> Image.Image:
    m = np.asarray(m)
    return Image.fromarray((m > (127 if m.dtype != bool else 0)).astype(np.uint8) * 255, mode="L")


# ----------------------------------------------------------------------------------------------
# the run's jobs and edits
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Job:
    run_dir: Path
    folder: Path
    manifest: dict[str, Any] | None
    manifest_error: str | None
    edits: pd.DataFrame

    def stores(self) -> list[Path]:
        """Where this job's edit folders may be: its configured cache_dir (as written, absolute
        or relative to the working directory), then the run's own ``edits/``."""
        cfg = (self.manifest or {}).get("config") or {}
        out = []
        if cfg.get("cache_dir"):
            out.append(Path(str(cfg["cache_dir"])))
        out.append(self.run_dir / "edits")
        return out

    def dataset_config(self) -> dict[str, Any] | None:
        cfg = (self.manifest or {}).get("config") or {}
        ds = cfg.get("dataset")
        return dict(ds) if isinstance(ds, Mapping) else None


def _load_jobs(run_dirs: Sequence[Path]) -> list[_Job]:
    jobs = []
    for d in run_dirs:
        for j in find_jobs(d):
            man, err = None, None
            try:
                man = json.loads((j / "manifest.json").read_text(encoding="utf-8"))
            except FileNotFoundError:
                err = "no manifest.json"
            except (OSError, ValueError) as e:
                err = f"manifest.json unreadable: {type(e).__name__}: {e}"
            edits = pd.read_parquet(j / "edits.parquet") if (j / "edits.parquet").is_file() else pd.DataFrame()
            jobs.append(_Job(Path(d), j, man, err, edits))
    return jobs


@dataclasses.dataclass
class _Cell:
    status: str
    reason: str | None
    folder: Path | None  # the edit's cache folder (status ok and found)


class _Sources:
    """Dataset samples for the grid, loaded on demand from each job's dataset config; a dataset
    that cannot be opened is recorded with the reason, never raised."""

    def __init__(self) -> None:
        self._datasets: dict[str, Any] = {}
        self._refs: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}  # dataset name -> why it could not be opened

    def sample(self, cfg: dict[str, Any] | None, dataset: str, sample_id: str) -> tuple[Any, str | None]:
        """(Sample or None, why not)."""
        if cfg is None:
            self.errors.setdefault(dataset, "the job manifest names no dataset config")
            return None, self.errors[dataset]
        key = json.dumps(cfg, sort_keys=True, default=str)
        if key not in self._datasets:
            try:
                from .data import open_dataset

                ds = open_dataset(cfg)
                self._refs[key] = {r.id: r for r in ds.refs()}
                self._datasets[key] = ds
            except Exception as e:  # any reason a dataset is not reachable here: report, not crash
                self._datasets[key] = None
                self.errors[dataset] = f"{type(e).__name__}: {e}"
        ds = self._datasets[key]
        if ds is None:
            return None, f"dataset '{dataset}' not reachable: {self.errors.get(dataset, '')}"
        ref = self._refs[key].get(sample_id)
        if ref is None:
            return None, f"sample '{sample_id}' is not in dataset '{dataset}' as configured now"
        if ref.error is not None:
            return None, str(ref.error)
        try:
            return ds.load(ref), None
        except Exception as e:  # a sample that cannot be decoded: its row says why
            return None, f"{type(e).__name__}: {e}"


def _group_label(g: tuple, multi_run: bool, multi_seed: bool) -> str:
    run, method, params, seed = g
    p = format_params(params, empty="")
    lab = method + (f" ({p})" if p else "")
    if multi_seed:
        lab += f" seed {seed}"
    return f"{run}: {lab}" if multi_run else lab


def pick_evenly(n: int, k: int) -> list[int]:
    """``k`` indices of ``range(n)`` at evenly spaced positions, first and last included."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [0][:k]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
def _img(uri: str, alt: str, size: tuple[int, int], cls: str, caption: str, key: str | None = None) -> str:
    """One thumbnail with its caption; ``cls`` says what it is (source, target, mask, edit, diff),
    ``key`` the edit's cache key (its folder: ``edits/<key[:2]>/<key>/``)."""
    k = f' data-edit-key="{esc(key)}"' if key else ""
    return (f'<figure class="thumb"><img src="{uri}" alt="{esc(alt)}" width="{size[0]}" height="{size[1]}" '
            f'class="{cls}"{k}><figcaption>{esc(caption)}</figcaption></figure>')


def _card(title: str, body: list[str], cls: str = "") -> str:
    return (f'<div class="card{(" " + cls) if cls else ""}"><div class="label">{esc(title)}</div>'
            '<div class="imgs">' + "".join(body) + "</div></div>")


def _read_cache_image(folder: Path, name: str) -> tuple[np.ndarray | None, str | None]:
    p = folder / name
    if not p.is_file():
        return None, None
    try:
        with Image.open(p) as im:
            return np.asarray(im), None
    except Exception as e:  # a damaged cache file: shown as such
        return None, f"{name} unreadable: {type(e).__name__}: {e}"


def grid_section(jobs: Sequence[_Job], max_samples: int = GRID_MAX_SAMPLES, max_images: int = GRID_MAX_IMAGES,
                 max_side: int = THUMB_MAX_SIDE, diff_against: str = "source") -> list[str]:
    if diff_against not in DIFF_AGAINST:
        raise ValueError(f"diff_against must be one of {', '.join(DIFF_AGAINST)}, not {diff_against!r}")
    cells: dict[tuple, dict[tuple, _Cell]] = {}  # (dataset, sample id) -> group -> cell
    ds_cfg: dict[str, dict[str, Any] | None] = {}
    categories: dict[tuple, str] = {}
    for job in jobs:
        e = job.edits
        if not len(e):
            continue
        for r in e.to_dict("records"):
            sk = (str(r["dataset"]), str(r["sample_id"]))
            g = (str(r["run"]), str(r["method"]), str(r["params"]), int(r["seed"]))
            if r.get("category") is not None and not (isinstance(r["category"], float)):
                categories.setdefault(sk, str(r["category"]))
            ds_cfg.setdefault(sk[0], job.dataset_config())
            if g in cells.get(sk, {}):
                continue
            folder = None
            if r["status"] == "ok":
                key = str(r["edit_key"])
                folder = next((s / key[:2] / key for s in job.stores() if (s / key[:2] / key / "edit.json").is_file()),
                              None)
            cells.setdefault(sk, {})[g] = _Cell(str(r["status"]), r.get("reason"), folder)
    groups = sorted({g for row in cells.values() for g in row},
                    key=lambda g: (g[0], g[1], params_sort_key(g[2]), g[3]))
    out = ['<section id="grid"><h2>Qualitative grid</h2>']
    if not cells:
        out += ["<p>No edits in these runs.</p></section>"]
        return out
    keys = sorted(cells)
    per_sample = 3 + 3 * len(groups)  # source, ground truth, dataset mask; edit, mask, diff per group
    cap = max(1, min(max_samples, max_images // per_sample))
    chosen = [keys[i] for i in pick_evenly(len(keys), cap)]
    multi_run = len({g[0] for g in groups}) > 1
    multi_seed = len({(g[0], g[1], g[2]) for g in groups}) < len(groups)
    against = "the dataset's ground truth (target; the source where a sample has none)" \
        if diff_against == "target" else "the source"
    out.append(
        f"<p>One row per sample: the source, the dataset's ground truth and mask where it has them, then for "
        f"each method and parameter point ({len(groups)}) its edit, the mask it used, and a difference map against "
        f"{esc(against)}. Difference map: per pixel, the mean over R, G, B of |edit &minus; reference| on the "
        f"0&ndash;255 scale, &times;{DIFF_GAIN}, clipped at 255 (black: unchanged; white: a difference of "
        f"{256 // DIFF_GAIN} levels or more), the reference resized (bicubic) to the edit's size where they "
        f"differ. Thumbnails at most {max_side} px a side (photos and maps JPEG quality {JPEG_QUALITY}, masks "
        f"PNG).</p>")
    if len(chosen) < len(keys):
        out.append(f'<p class="cap">Showing {len(chosen)} of {len(keys)} samples; {len(keys) - len(chosen)} left '
                   f"out. Cap: at most {max_samples} samples and {max_images} images "
                   f"({per_sample} per sample here), the samples taken at evenly spaced positions of the "
                   f"(dataset, sample id) order.</p>")
    sources = _Sources()
    body: list[str] = []
    for sk in chosen:
        dataset, sid = sk
        sample, why = sources.sample(ds_cfg.get(dataset), dataset, sid)
        head = f"{dataset} / {sid}" + (f" ({categories[sk]})" if sk in categories else "")
        row = [f'<div class="sample"><h3>{esc(head)}</h3>']
        texts = []
        if sample is not None:
            for f in ("instruction", "source_caption", "target_caption"):
                if getattr(sample, f, None):
                    texts.append(f"<b>{f}</b>: {esc(getattr(sample, f))}")
        if texts:
            row.append('<p class="texts">' + "<br>".join(texts) + "</p>")
        if why:
            row.append(f'<p class="note">Source not shown: {esc(why)}</p>')
        row.append('<div class="cards">')
        src = _rgb(sample.source) if sample is not None else None
        tgt = _rgb(sample.target) if sample is not None and sample.target is not None else None
        if src is not None:
            t = thumbnail(Image.fromarray(src), max_side)
            row.append(_card("source", [_img(data_uri(t, "JPEG"), f"source {sid}", t.size, "source", "source")]))
        if tgt is not None:
            t = thumbnail(Image.fromarray(tgt), max_side)
            row.append(_card("ground truth", [_img(data_uri(t, "JPEG"), f"ground truth {sid}", t.size, "target",
                                                   "target")]))
        if sample is not None and sample.mask is not None:
            t = thumbnail(_mask_img(sample.mask), max_side, mask=True)
            row.append(_card("dataset mask", [_img(data_uri(t, "PNG"), f"dataset mask {sid}", t.size, "mask", "mask")]))
        ref = tgt if diff_against == "target" and tgt is not None else src
        ref_name = "ground truth" if ref is tgt and tgt is not None else "source"
        for g in groups:
            lab = _group_label(g, multi_run, multi_seed)
            c = cells[sk].get(g)
            if c is None:
                row.append(_card(lab, ['<p class="note">no edit of this sample</p>'], "missing"))
                continue
            if c.status != "ok":
                row.append(_card(lab, [f'<p class="status {esc(c.status)}">{esc(c.status)}: {esc(c.reason or "")}</p>'],
                                 c.status))
                continue
            if c.folder is None:
                row.append(_card(lab, ['<p class="note">edit not found in the cache (removed, or cache_dir moved)</p>'],
                                 "missing"))
                continue
            parts = []
            edit, err = _read_cache_image(c.folder, "edit.png")
            if edit is None:
                parts.append(f'<p class="note">{esc(err or "edit.png missing from the cache")}</p>')
            else:
                edit = _rgb(edit)
                t = thumbnail(Image.fromarray(edit), max_side)
                parts.append(_img(data_uri(t, "JPEG"), f"edit {lab} {sid}", t.size, "edit", "edit", c.folder.name))
            mask, merr = _read_cache_image(c.folder, "mask.png")
            if mask is not None:
                t = thumbnail(_mask_img(mask), max_side, mask=True)
                parts.append(_img(data_uri(t, "PNG"), f"mask {lab} {sid}", t.size, "mask", "mask", c.folder.name))
            else:
                parts.append(f'<p class="note">{esc(merr or "no mask (the method used none)")}</p>')
            if edit is not None and ref is not None:
                t = thumbnail(Image.fromarray(diff_map(edit, ref), mode="L"), max_side)
                parts.append(_img(data_uri(t, "JPEG"), f"difference vs {ref_name} {lab} {sid}", t.size, "diff",
                                  f"|edit - {ref_name}| x{DIFF_GAIN}", c.folder.name))
            elif edit is not None:
                parts.append('<p class="note">no difference map (no source)</p>')
            row.append(_card(lab, parts))
        row.append("</div></div>")
        body += row
    if sources.errors:
        out.append('<p class="note">' + " ".join(
            f"Dataset '{esc(d)}' could not be opened here ({esc(e)}): the grid shows the edits only, without "
            f"sources or difference maps." for d, e in sorted(sources.errors.items())) + "</p>")
    out += body
    out.append("</section>")
    return out


def manifest_section(jobs: Sequence[_Job]) -> list[str]:
    out = ['<section id="manifests"><h2>Run manifests</h2>',
           "<p>Each job's <code>manifest.json</code>: its resolved config, method, dataset, metrics, library "
           "versions, host and outcome.</p>"]
    for job in jobs:
        title = f"{job.run_dir.name}/jobs/{job.folder.name}"
        if job.manifest is not None:
            counts = (job.manifest.get("outcome") or {}).get("counts")
            if counts:
                order = [st.value for st in EditStatus]  # ok, skipped, failed (the file sorts its keys)
                title += " (" + ", ".join(f"{k} {counts[k]}" for k in sorted(counts, key=lambda k: (
                    order.index(k) if k in order else len(order), k))) + ")"
            body = f"<pre>{esc(json.dumps(job.manifest, indent=2, ensure_ascii=False, default=str))}</pre>"
        else:
            body = f'<p class="note">{esc(job.manifest_error)}</p>'
        out.append(f"<details><summary>{esc(title)}</summary>{body}</details>")
    out.append("</section>")
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
th,td{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f2f2f2;cursor:pointer;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.num,th.num{text-align:right;white-space:nowrap}
figure{display:inline-block;margin:0 1em 1em 0}figure img{max-width:640px;height:auto}
.cards{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.card{border:1px solid #ddd;padding:4px}
.card .label{font-size:12px;font-weight:bold;margin-bottom:2px;max-width:780px}
.imgs{display:flex;gap:3px;align-items:flex-start}
figure.thumb{margin:0}figure.thumb figcaption{font-size:11px;color:#555}
.scroll{overflow-x:auto}details.caption summary{cursor:pointer;color:#444}
.note,.status{font-size:12px;color:#666;max-width:260px}
.status.failed{color:#b00}.cap{font-weight:bold}
pre{font-size:12px;background:#f7f7f7;padding:6px;overflow:auto;max-height:40em}
"""

# Sorting by a header click: numeric when both cells start with a number (KiB / MiB / GiB
# scaled), text otherwise; cells with no value (n/a, em dash) last.
_SCRIPT = """
(function(){
function val(td){var t=td.textContent.trim();if(t==='inf')return Infinity;if(t==='-inf')return -Infinity;
var v=parseFloat(t);if(isNaN(v))return t===''||t==='n/a'||t==='\\u2014'?null:t;
var u={'KiB':1024,'MiB':1048576,'GiB':1073741824}[(t.match(/ (KiB|MiB|GiB)$/)||[])[1]];return u?v*u:v;}
document.querySelectorAll('table.sortable').forEach(function(tb){
tb.querySelectorAll('thead th').forEach(function(th,k){th.title='click to sort';
th.addEventListener('click',function(){var body=tb.tBodies[0],asc=!th.classList.contains('asc');
tb.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
th.classList.add(asc?'asc':'desc');
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=val(a.cells[k]||a),y=val(b.cells[k]||b);
if(x===null||y===null)return x===y?0:(x===null?1:-1);
var r=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));return asc?r:-r;});
rows.forEach(function(r){body.appendChild(r);});});});});
})();
"""


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix()


def write_html_report(run_dirs: str | Path | Sequence[str | Path], out_dir: str | Path,
                      files: Mapping[str, Path], *, max_samples: int = GRID_MAX_SAMPLES,
                      max_images: int = GRID_MAX_IMAGES, max_side: int = THUMB_MAX_SIDE,
                      diff_against: str = "source") -> Path:
    """Write ``out_dir/index.html`` from the report files already written (``files``, as
    :func:`harness.report.write_report` returns them) and the runs' jobs; returns its path."""
    out_dir = Path(out_dir)
    dirs = _as_dirs(run_dirs)
    jobs = _load_jobs(dirs)
    paths = {name: Path(p) for name, p in files.items()}
    mds = [n for n in _TABLE_FILES if n in paths]
    mds += sorted(n for n, p in paths.items() if p.suffix == ".md" and n not in mds and n != _EDITS_FILE)
    plots = sorted((n, p) for n, p in paths.items() if p.suffix.lower() == ".png" and p.is_file())
    runs = ", ".join(d.name for d in dirs)
    doc = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>edit-harness report: {esc(runs)}</title>", f"<style>{_STYLE}</style></head><body>",
           f"<h1>edit-harness report: {esc(runs)}</h1>",
           '<nav><a href="#tables">Tables</a> · <a href="#plots">Plots</a> · <a href="#grid">Qualitative grid</a> · '
           '<a href="#edits">Edits, failures and skips</a> · <a href="#manifests">Run manifests</a> · '
           '<a href="#files">Files</a></nav>',
           '<section id="tables"><h2>Tables</h2><p>Click a column header to sort.</p>']
    for n in mds:
        doc.append(f'<div class="mdfile" data-file="{esc(n)}">')
        doc.append(markdown_to_html(paths[n].read_text(encoding="utf-8"), level=3))
        doc.append("</div>")
    doc.append("</section>")
    doc.append('<section id="plots"><h2>Plots</h2>')
    if plots:
        for n, p in plots:
            doc.append(f'<figure><a href="{esc(_rel(p, out_dir))}"><img src="{esc(_rel(p, out_dir))}" '
                       f'alt="{esc(n)}"></a><figcaption>{esc(n)}</figcaption></figure>')
    else:
        doc.append("<p>No plots in this report.</p>")
    doc.append("</section>")
    doc += grid_section(jobs, max_samples, max_images, max_side, diff_against)
    doc.append('<section id="edits"><h2>Edits, failures and skips</h2>')
    if _EDITS_FILE in paths:
        doc.append(f'<div class="mdfile" data-file="{esc(_EDITS_FILE)}">')
        doc.append(markdown_to_html(paths[_EDITS_FILE].read_text(encoding="utf-8"), level=3))
        doc.append("</div>")
    doc.append("</section>")
    doc += manifest_section(jobs)
    listed = sorted((n, p) for n, p in paths.items() if Path(p).is_file())
    doc.append('<section id="files"><h2>Files</h2><ul>')
    doc += [f'<li><a href="{esc(_rel(p, out_dir))}">{esc(_rel(p, out_dir))}</a></li>' for n, p in listed]
    doc.append("</ul></section>")
    doc.append(f"<script>{_SCRIPT}</script></body></html>")
    path = out_dir / HTML_FILE
    save_bytes(path, ("\n".join(doc) + "\n").encode("utf-8"))
    return path


__all__ = ["write_html_report", "markdown_to_html", "markdown_tables", "split_row", "diff_map", "pick_evenly",
           "HTML_FILE", "GRID_MAX_SAMPLES", "GRID_MAX_IMAGES", "THUMB_MAX_SIDE", "DIFF_GAIN"]
