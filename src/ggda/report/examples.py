"""The report's data views: examples next to their influences, a group gallery and flagged
noisy-label examples, each example shown in its modality's form.

Reads only what :func:`ggda.applications.experiment.save_inspection` wrote (``OUT/inspect``):
images become PNG thumbnails under ``OUT/examples/`` (min-max scaled per image, from the
un-standardised features), tabular rows small feature tables, texts escaped snippets. Which
examples appear is decided by :mod:`ggda.report.select` from the saved scores, so what the page
shows is what the saved numbers say. Every user-controlled string is HTML-escaped.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggda.io import atomic_open
from ggda.report import select

MAX_FEATURES = 8  # rows of a tabular example's table
MAX_TEXT = 280  # characters of a text snippet

STYLE = """
.exrow{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;margin:.3em 0 1em}
.ex{margin:0;text-align:center;font-size:11px;max-width:160px}
.ex img{width:56px;height:56px;image-rendering:pixelated;border:1px solid #999}
.ex.target img{border:3px solid #333}
.ex table{font-size:10px;margin:0} .ex blockquote{margin:0;text-align:left;font-size:11px;max-width:160px}
.extab td,.extab th{font-size:11px;padding:1px 5px} .extab tr.help td:first-child{color:#075}
.extab tr.harm td:first-child{color:#a20} .extab tr.target{font-weight:bold}
.sep{align-self:center;font-weight:bold;padding:0 6px;font-size:12px}
.help figcaption{color:#075} .harm figcaption{color:#a20} .flip{color:#a00;font-weight:bold}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{flex:1 1 45%;border:1px solid #ddd;padding:6px 10px;margin:3px 0;border-radius:4px;font-size:13px}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


@dataclass
class Inspection:
    """The saved data views of one experiment (``OUT/inspect``)."""

    record: dict
    arrays: dict[str, np.ndarray]

    @classmethod
    def load(cls, out: str | Path) -> Inspection | None:
        """The inspection saved under ``out/inspect``, or ``None`` when there is none."""
        root = Path(out) / "inspect"
        if not (root / "inspect.json").is_file() or not (root / "inspect.npz").is_file():
            return None
        record = json.loads((root / "inspect.json").read_text(encoding="utf-8"))
        with np.load(root / "inspect.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls(record, arrays)

    def label(self, y) -> str:
        names = self.record.get("class_names")
        return str(names[int(y)]) if names and 0 <= int(y) < len(names) else str(y)


class Renderer:
    """Writes one example in its modality's form and returns its HTML (a ``<figure>``)."""

    def __init__(self, insp: Inspection, out: Path) -> None:
        self.insp, self.out = insp, Path(out)
        self.modality = insp.record.get("modality", "tabular")
        a = insp.arrays
        self.train_rows = {int(i): r for r, i in enumerate(a.get("display_ids", np.zeros(0)).tolist())}
        self.target_rows = {int(i): r for r, i in enumerate(a.get("target_ids", np.zeros(0)).tolist())}
        self.texts = {str(k): v for k, v in (insp.record.get("texts") or {}).items()}
        self.written: set[str] = set()

    def features(self, split: str, ident: int) -> np.ndarray | None:
        a = self.insp.arrays
        rows, X = (
            (self.train_rows, a.get("display_X"))
            if split == "train"
            else (self.target_rows, a.get("target_X"))
        )
        if X is None or ident not in rows:
            return None
        return X[rows[ident]]

    def thumbnail(self, split: str, ident: int, x: np.ndarray) -> str:
        """Write ``examples/{split}_{id}.png`` (once) and return its relative path."""
        name = f"examples/{split}_{int(ident)}.png"
        path = self.out / name
        if name not in self.written:  # rewritten each render: a reused folder never shows stale images
            self.written.add(name)
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            shape = tuple(self.insp.record["image_shape"])
            img = np.asarray(x, dtype=np.float64).reshape(shape)
            if img.ndim == 3:
                img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)[..., :3]
            lo, hi = float(img.min()), float(img.max())
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as fh:
                plt.imsave(fh, img, cmap="gray_r" if img.ndim == 2 else None, format="png", vmin=0, vmax=1)
        return name

    def body(self, split: str, ident: int) -> str:
        if self.modality == "text":
            text = self.texts.get(f"{split}:{ident}", self.texts.get(str(ident)))
            if text is None:
                return f"<div>id {_e(ident)} (not saved)</div>"
            short = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"
            return f"<blockquote>{_e(short)}</blockquote>"
        x = self.features(split, ident)
        if x is None:
            return f"<div>id {_e(ident)} (not saved)</div>"
        if self.modality == "image":
            return f"<img src='{_e(self.thumbnail(split, ident, x))}' alt='{_e(split)} id {_e(ident)}'>"
        names = self.insp.record.get("feature_names") or [f"x{i}" for i in range(len(x))]
        rows = "".join(
            f"<tr><td>{_e(n)}</td><td>{v:.4g}</td></tr>"
            for n, v in zip(names[:MAX_FEATURES], x[:MAX_FEATURES], strict=False)
        )
        more = f"<tr><td colspan=2>… {len(x) - MAX_FEATURES} more</td></tr>" if len(x) > MAX_FEATURES else ""
        return f"<table>{rows}{more}</table>"

    def block(self, items: list[tuple], attrs: str = "") -> str:
        """A row of examples: ``("sep", text)`` separators and ``(split, id, caption, cls)``
        examples (``caption`` is HTML the caller escaped). Images and texts become a row of
        figures; tabular rows one small table (a row per example, a column per feature)."""
        if self.modality != "tabular":
            cells = [
                f"<span class='sep'>{_e(item[1])}</span>" if item[0] == "sep" else self.figure(*item)
                for item in items
            ]
            return f"<div class='exrow' {attrs}>{''.join(cells)}</div>"
        width = len(next((x for x in self.insp.arrays.get("display_X", [])), [])) or 0
        names = (self.insp.record.get("feature_names") or [f"x{i}" for i in range(width)])[:MAX_FEATURES]
        more = "<th>…</th>" if width > MAX_FEATURES else ""
        head = "<tr><th>example</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + more + "</tr>"
        rows = []
        for item in items:
            if item[0] == "sep":
                rows.append(f"<tr><th colspan='{len(names) + 2}'>{_e(item[1])}</th></tr>")
                continue
            split, ident, caption, cls = (*item, "")[:4]
            x = self.features(split, ident)
            values = (
                "".join(f"<td>{v:.4g}</td>" for v in x[:MAX_FEATURES])
                if x is not None
                else f"<td colspan='{len(names)}'>not saved</td>"
            )
            rows.append(
                f"<tr class='ex {cls}' data-split='{_e(split)}' data-id='{int(ident)}'>"
                f"<td>{caption}</td>{values}{'<td></td>' if more else ''}</tr>"
            )
        return f"<table class='extab' {attrs}>{head}{''.join(rows)}</table>"

    def figure(self, split: str, ident: int, caption: str, cls: str = "") -> str:
        """An example with its caption (``caption`` is HTML the caller escaped)."""
        return (
            f"<figure class='ex {cls}' data-split='{_e(split)}' data-id='{int(ident)}'>"
            f"{self.body(split, ident)}<figcaption>{caption}</figcaption></figure>"
        )


def influential_section(insp: Inspection, r: Renderer) -> str:
    """Per method, each target test point next to its most helpful and most harmful training points."""
    a, rec = insp.arrays, insp.record
    if not rec.get("point_scores"):
        return ""
    k = int(rec.get("top_k", select.TOP_K))
    train_ids, train_y = a["train_ids"], a["train_y"]
    parts = [
        "<h2>Test points and their most influential training examples</h2>"
        f"<p class='note'>Per-point attribution of each test point's loss (positive = helpful: training on the "
        f"example lowers this test loss). Left: the test point (thick border) with its label; then its {k} most "
        f"helpful and {k} most harmful training examples with score and label.</p>"
    ]
    for method, name in rec["point_scores"].items():
        scores = a[name]
        parts.append(f"<h3>{_e(method)} (per point)</h3>")
        for t, (tid, ty) in enumerate(zip(a["target_ids"].tolist(), a["target_y"].tolist(), strict=True)):
            helpful, harmful = select.top_bottom(scores[t], k)
            items: list[tuple] = [("test", tid, f"test id {_e(tid)}<br>label {_e(insp.label(ty))}", "target")]
            for kind, pos in (("help", helpful), ("harm", harmful)):
                items.append(("sep", "helpful" if kind == "help" else "harmful"))
                for p in pos:
                    items.append(
                        (
                            "train",
                            int(train_ids[p]),
                            f"{scores[t, p]:+.3g}<br>id {int(train_ids[p])}, {_e(insp.label(train_y[p]))}",
                            kind,
                        )
                    )
            parts.append(r.block(items, f"data-method='{_e(method)}' data-target='{int(tid)}'"))
    return "\n".join(parts)


def gallery_section(insp: Inspection, r: Renderer) -> str:
    """Per grouping at the gallery K: the most helpful groups with size, class mix, scores and members."""
    a, rec = insp.arrays, insp.record
    if not rec.get("groupings"):
        return ""
    train_ids, train_y = a["train_ids"], a["train_y"]
    parts = [
        f"<h2>Group gallery (K = {_e(rec.get('gallery_k'))})</h2>"
        "<p class='note'>For each grouping, its most helpful groups by the group score of the first method "
        "(mean-test-loss attribution of removing the whole group; group score = sum over members). "
        "Class mix counts training labels; members are a seeded random sample.</p>"
    ]
    seed = int(rec.get("seed", 0))
    for glabel, entry in rec["groupings"].items():
        if not entry["scores"]:
            continue
        labels = a[entry["labels"]]
        sizes = np.bincount(labels, minlength=int(entry["K"]))
        gscores = {m: a[n] for m, n in entry["scores"].items()}
        first_method, first = next(iter(gscores.items()))
        parts.append(
            f"<h3>{_e(entry['grouping'])}, K = {_e(entry['K'])} (ranked by {_e(first_method)})</h3>"
            f"<p class='note'>group sizes {int(sizes.min())}–{int(sizes.max())} (median {float(np.median(sizes)):g})</p>"
            "<div class='cards'>"
        )
        for g in select.gallery_groups(first, select.GALLERY_GROUPS):
            g = int(g)
            members = np.flatnonzero(labels == g)
            mix = np.unique(train_y[members], return_counts=True)
            mix_text = ", ".join(f"{_e(insp.label(c))}: {int(n)}" for c, n in zip(*mix, strict=True))
            score_text = "; ".join(
                f"{_e(m)} score {s[g]:+.3g} (mean per member {s[g] / max(len(members), 1):+.3g})"
                for m, s in gscores.items()
            )
            shown = select.gallery_members(labels, g, select.GALLERY_MEMBERS, seed)
            figs = r.block(
                [
                    ("train", int(train_ids[p]), f"id {int(train_ids[p])}, {_e(insp.label(train_y[p]))}", "")
                    for p in shown
                ]
            )
            parts.append(
                f"<div class='card' data-grouping='{_e(glabel)}' data-group='{g}'><b>group {g}</b>: "
                f"size {len(members)}; class mix {mix_text}<br>{score_text}{figs}</div>"
            )
        parts.append("</div>")
    return "\n".join(parts)


def flagged_section(insp: Inspection, r: Renderer) -> str:
    """The top flagged training points of the noisy-label study (per-point attribution)."""
    flagged = insp.record.get("flagged") or {}
    if not flagged:
        return ""
    parts = [
        "<h2>Flagged noisy-label examples</h2>"
        "<p class='note'>Training points of the noisy-label model (labels flipped at random) ranked most suspicious "
        "by per-point attribution, most suspicious first: given (possibly flipped) label, original label, and "
        "whether it was actually flipped.</p>"
    ]
    for method, by_rank in flagged.items():
        for ranking, f in by_rank.items():
            found = int(sum(bool(v) for v in f["flipped"]))
            items = []
            for i, s, given, orig, flip in zip(
                f["ids"], f["suspicion"], f["given"], f["original"], f["flipped"], strict=True
            ):
                state = "<span class='flip'>flipped</span>" if flip else "not flipped"
                items.append(
                    (
                        "train",
                        int(i),
                        f"id {int(i)}: given {_e(insp.label(given))}, original {_e(insp.label(orig))}<br>"
                        f"{state}, suspicion {s:.3g}",
                        "",
                    )
                )
            parts.append(
                f"<h3>{_e(method)}, {_e(ranking)}: {found} of the top {len(f['ids'])} were flipped "
                f"(AUC {float(f.get('auc', float('nan'))):.3f})</h3>"
                + r.block(items, f"data-method='{_e(method)}' data-ranking='{_e(ranking)}'")
            )
    return "\n".join(parts)


def data_sections(out: str | Path) -> str:
    """All data views of the experiment saved under ``out`` (empty when none were saved)."""
    insp = Inspection.load(out)
    if insp is None:
        return ""
    r = Renderer(insp, Path(out))
    return "\n".join(
        s for s in (influential_section(insp, r), gallery_section(insp, r), flagged_section(insp, r)) if s
    )
