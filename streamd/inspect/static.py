"""`streamd features`: dashboards written once as static HTML + JSON, for sharing.

``OUT/index.html`` lists the SAEs; ``OUT/<sae>/dashboard.json`` holds all the data; ``OUT/<sae>/index-<sort>.html``
is the index pre-sorted each way (a static page cannot sort on a query parameter) and ``OUT/<sae>/index.html`` the
one by latent; ``OUT/<sae>/latent/<i>.html`` one page per latent shown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamd.inspect.html import SORTS, Links, home_page, index_page, latent_page

SAE_LINKS = Links(sae_index=lambda _n, s: "index.html" if s == "index" else f"index-{s}.html",
                        latent=lambda _n, i: f"latent/{i}.html", home=lambda: "../index.html")
_LINKS_FROM_LATENT = Links(sae_index=lambda _n, s: "../" + SAE_LINKS.sae_index(_n, s),
                           latent=lambda _n, i: f"{i}.html", home=lambda: "../../index.html")
_LINKS_FROM_HOME = Links(sae_index=lambda n, s: f"{n}/" + SAE_LINKS.sae_index(n, s),
                         latent=lambda n, i: f"{n}/latent/{i}.html", home=lambda: "index.html")


def write_static(dashboards: dict[str, dict[str, Any]], out: Path) -> Path:
    """Write every page and JSON file under ``out``; returns ``out / "index.html"``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, dash in dashboards.items():
        d = out / name
        (d / "latent").mkdir(parents=True, exist_ok=True)
        (d / "dashboard.json").write_text(json.dumps(dash))
        for sort in SORTS:
            (d / SAE_LINKS.sae_index(name, sort)).write_bytes(index_page(dash, sort, SAE_LINKS))
        for i in dash["latents"]:
            (d / "latent" / f"{i}.html").write_bytes(latent_page(dash, int(i), _LINKS_FROM_LATENT))
    (out / "index.html").write_bytes(home_page(dashboards, _LINKS_FROM_HOME))
    return out / "index.html"
