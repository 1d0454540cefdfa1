"""HTML of the dashboards: self-contained pages (inline CSS, no script, no external resource), readable without
JavaScript. The same functions render the static export and the served browser; only the links differ
(:class:`Links`)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SORTS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "index": ("latent", lambda r: r["i"]),
    "density": ("density, highest first", lambda r: (-r["density"], r["i"])),
    "rare": ("density, rarest live first", lambda r: (r["dead"], r["density"], r["i"])),
    "max_act": ("max activation, highest first", lambda r: (-r["max_act"], r["i"])),
}

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}.dead{color:#999}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap}.ctx span{border-radius:2px}
mark.hl{background:#f60;color:#fff;font-weight:bold;outline:1px solid #c40}
.bars{display:flex;align-items:flex-end;height:80px;gap:1px}.bars div{background:#36c;width:10px}
.meta{color:#555}.tag{background:#eee;padding:0 4px;border-radius:3px;font-family:ui-monospace,monospace}"""


@dataclass
class Links:
    """Where a page links to: ``sae_index(name, sort)``, ``latent(name, i)`` and ``home()`` (relative files for
    the static export, URLs for the served browser)."""

    sae_index: Callable[[str, str], str]
    latent: Callable[[str, int], str]
    home: Callable[[], str]


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>").encode()


def _age(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else f"{s // 60}m {s % 60}s"


def _metrics_line(dash: dict[str, Any]) -> str:
    m = dash["metrics"]
    return (f"CE loss recovered {m['ce_loss_score']:.4f} &middot; KL {m['kl']:.4g} &middot; FVU {m['fvu']:.4f} "
            f"&middot; L0 {m['l0']:.2f} &middot; {dash['n_tokens']:,} held-out tokens")


def home_page(dashboards: dict[str, dict[str, Any]], links: Links, *, stale: str = "") -> bytes:
    """Every SAE of the last inspection with its metrics; ``stale`` says why it may be out of date."""
    rows = "".join(
        f"<tr><td><a href='{_e(links.sae_index(n, 'index'))}'>{_e(n)}</a></td><td>{_e(d['hook'])}</td>"
        f"<td>{_e(d['checkpoint'])}</td><td>{_metrics_line(d)}</td><td>built {_age(d['built_at'])} ago</td></tr>"
        for n, d in dashboards.items())
    note = f"<p class=meta><b>{_e(stale)}</b></p>" if stale else ""
    return _page("streamd inspector", f"<h1>streamd inspector</h1>{note}<table><tr><th>SAE</th><th>hook</th>"
                 f"<th>checkpoint</th><th>metrics</th><th>age</th></tr>{rows}</table>")


def sorted_rows(dash: dict[str, Any], sort: str, query: str = "") -> list[dict[str, Any]]:
    """The index rows in ``sort`` order, only those whose top tokens or top contexts hold ``query``."""
    if sort not in SORTS:
        raise ValueError(f"sort {sort!r} is not one of {sorted(SORTS)}")
    rows = dash["index"]
    if query:
        q = query.lower()

        def hit(r: dict[str, Any]) -> bool:
            if any(q == t.strip().lower() for t in r["top_tokens"]):
                return True
            lat = dash["latents"].get(str(r["i"]))
            return lat is not None and any(q in "".join(e["tokens"]).lower() for e in lat["top"])

        rows = [r for r in rows if hit(r)]
    return sorted(rows, key=SORTS[sort][1])


def index_page(dash: dict[str, Any], sort: str, links: Links, query: str = "", *, search: bool = False,
               stale: str = "") -> bytes:
    """The latents of one SAE sorted by ``sort``; ``search`` adds the query form (served pages only)."""
    name = dash["sae"]
    rows = sorted_rows(dash, sort, query)
    sorts = " | ".join(f"<b>{_e(label)}</b>" if key == sort else
                       f"<a href='{_e(links.sae_index(name, key))}'>{_e(label)}</a>" for key, (label, _) in SORTS.items())
    form = (f"<form method=get><input type=hidden name=sort value='{_e(sort)}'><input name=q value='{_e(query)}' "
            f"placeholder='token or text'> <button>search</button></form>") if search else ""
    body = []
    for r in rows:
        cls = " class=dead" if r["dead"] else ""
        label = f"<a href='{_e(links.latent(name, r['i']))}'>{r['i']}</a>" if r["page"] else str(r["i"])
        tokens = " ".join(f"<span class=tag>{_e(t)}</span>" for t in r["top_tokens"])
        status = "dead" if r["dead"] else ""
        body.append(f"<tr{cls} data-latent={r['i']}><td>{label}</td><td class=num>{r['density']:.3e}</td>"
                    f"<td class=num>{r['max_act']:.4g}</td><td>{status}</td><td>{tokens}</td></tr>")
    dead = sum(r["dead"] for r in dash["index"])
    note = f"<p class=meta><b>{_e(stale)}</b></p>" if stale else ""
    return _page(f"{name}: latents", (
        f"<p><a href='{_e(links.home())}'>all SAEs</a></p><h1>{_e(name)}</h1>{note}"
        f"<p class=meta>{_e(dash['hook'])} &middot; checkpoint {_e(dash['checkpoint'])} &middot; {dash['d_sae']:,} "
        f"latents, {dead:,} dead on this sample &middot; {_metrics_line(dash)}</p>"
        f"<p>sort by: {sorts}</p>{form}<p class=meta>{len(rows):,} latents shown</p>"
        f"<table id=latents><tr><th>latent</th><th>density</th><th>max act</th><th></th><th>top tokens</th></tr>"
        f"{''.join(body)}</table>"))


def _context(ex: dict[str, Any], peak: float) -> str:
    parts = []
    for j, (t, a) in enumerate(zip(ex["tokens"], ex["acts"])):
        if j == ex["center"]:
            parts.append(f"<mark class=hl title='{a:.4g}'>{_e(t)}</mark>")
        elif a > 0:
            alpha = min(1.0, a / peak) if peak > 0 else 0
            parts.append(f"<span style='background:rgba(255,102,0,{alpha * 0.6:.2f})' title='{a:.4g}'>{_e(t)}</span>")
        else:
            parts.append(_e(t))
    return "".join(parts)


def _examples_table(examples: list[dict[str, Any]], peak: float) -> str:
    if not examples:
        return "<p class=meta>none in this sample</p>"
    rows = "".join(f"<tr><td class=num>{ex['act']:.4g}</td><td class=ctx>{_context(ex, peak)}</td></tr>"
                   for ex in examples)
    return f"<table class=examples><tr><th>act</th><th>context</th></tr>{rows}</table>"


def latent_page(dash: dict[str, Any], i: int, links: Links) -> bytes:
    """One latent's dashboard: top contexts, interval samples, histogram, logit effects."""
    lat = dash["latents"][str(i)]
    name, peak = dash["sae"], lat["max_act"]
    counts = lat["histogram"]["counts"]
    top_count = max(counts) or 1
    bars = "".join(f"<div style='height:{max(1, round(80 * c / top_count)) if c else 0}px' title='{c}'></div>"
                   for c in counts)
    intervals = "".join(f"<h3>activations in ({iv['lo']:.4g}, {iv['hi']:.4g}]</h3>"
                        f"{_examples_table(iv['examples'], peak)}" for iv in lat["intervals"])

    def logit_list(pairs: list) -> str:
        return "".join(f"<tr><td class=ctx>{_e(t)}</td><td class=num>{v:+.3g}</td></tr>" for t, v in pairs)

    return _page(f"{name} latent {i}", (
        f"<p><a href='{_e(links.sae_index(name, 'index'))}'>{_e(name)}</a></p><h1>{_e(name)} latent {i}</h1>"
        f"<p class=meta>density {lat['density']:.3e} &middot; max activation {peak:.4g} &middot; "
        f"{_e(dash['hook'])} &middot; checkpoint {_e(dash['checkpoint'])}</p>"
        f"<h2>top activations</h2>{_examples_table(lat['top'], peak)}"
        f"<h2>activation histogram</h2><p class=meta>{len(counts)} bins on (0, {peak:.4g}]</p>"
        f"<div class=bars>{bars}</div><h2>interval samples</h2>{intervals}"
        f"<h2>logit effects</h2><p class=meta>{_e(dash['logit_note'])}</p><table><tr><th>raised</th><th></th>"
        f"<th>lowered</th><th></th></tr><tr><td colspan=2><table>{logit_list(lat['logits']['up'])}</table></td>"
        f"<td colspan=2><table>{logit_list(lat['logits']['down'])}</table></td></tr></table>"))
