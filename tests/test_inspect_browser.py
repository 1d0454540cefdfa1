"""The feature browser in a real browser: Debian's headless Chromium renders the served pages. The screenshot is not
blank, the DOM holds the highlighted token with its activation, and ``?sort=`` orders the index as the JSON API does.
Skips (with the reason) where Chromium is not installed (`./install.sh --dev` installs it as root)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from streamd.config import InspectConfig, StreamdConfig
from streamd.inspect.follow import InspectorRole
from streamd.inspect.inspection import Inspector
from streamd.inspect.sample import sample_windows
from streamd.produce.model import load_frozen_model
from tests.test_inspect import CONTEXT, DOCS, random_sae, write_checkpoint
from tests.test_inspect_serve import get

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)")


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", *args, url],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def browser(tiny_llama_dir, tmp_path_factory):
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("browser")
    loaded = load_frozen_model(str(tiny_llama_dir))
    write_checkpoint(tmp / "run", "blocks.1.hook_resid_post", random_sae(64, 32, 0.0, seed=5), "a")
    cfg = StreamdConfig(inspect=InspectConfig(port=0, out_dir=tmp / "ins", top_n=4, context_window=4))
    windows = sample_windows(loaded.tokenizer, iter(DOCS), CONTEXT, 512)
    role = InspectorRole(cfg, Inspector(loaded, windows, cfg.inspect), str(tmp / "run"))
    assert role.poll()
    with role.server:
        yield role.server.url


def test_screenshot_is_not_blank(browser, tmp_path):
    from PIL import Image

    chromium(tmp_path, f"{browser}/sae/a/?sort=density", "--screenshot=shot.png")
    chromium(tmp_path, f"{browser}/sae/a/latent/0", "--screenshot=latent.png")
    img = Image.open(tmp_path / "shot.png").convert("RGB")
    colors = img.getcolors(maxcolors=1 << 24)  # [(count, (r, g, b))]
    white = sum(n for n, c in colors if c == (255, 255, 255))
    total = img.size[0] * img.size[1]
    assert img.size == (1200, 900) and total - white > 0.02 * total and len(colors) > 20


def test_dom_holds_the_highlighted_token_and_its_activation(browser, tmp_path):
    rows = json.loads(get(f"{browser}/api/sae/a?sort=max_act", None)[1])["index"]
    i = rows[0]["i"]
    ex = json.loads(get(f"{browser}/api/sae/a/latent/{i}", None)[1])["top"][0]
    dom = chromium(tmp_path, f"{browser}/sae/a/latent/{i}", "--dump-dom")
    first_row = dom.split("top activations")[1].split("</tr>")[1]
    token = ex["tokens"][ex["center"]].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f'<mark class="hl" title="{ex["act"]:.4g}">{token}</mark>' in first_row
    assert f'<td class="num">{ex["act"]:.4g}</td>' in first_row


@pytest.mark.parametrize("sort", ["density", "max_act", "rare", "index"])
def test_sort_orders_the_index_as_the_json_says(browser, tmp_path, sort):
    rows = json.loads(get(f"{browser}/api/sae/a?sort={sort}", None)[1])["index"]
    dom = chromium(tmp_path, f"{browser}/sae/a/?sort={sort}", "--dump-dom")
    shown = [int(m) for m in re.findall(r'data-latent="(\d+)"', dom)]
    assert shown == [r["i"] for r in rows] and len(shown) == 32
    key = {"density": lambda r: -r["density"], "max_act": lambda r: -r["max_act"], "index": lambda r: r["i"],
           "rare": lambda r: (r["dead"], r["density"])}[sort]
    assert [key(r) for r in rows] == sorted(key(r) for r in rows)
