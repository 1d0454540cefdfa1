"""Checkpoints load in real SAELens (``SAE.load_from_disk``) and encode/decode exactly as streamd's own modules.

SAELens lives in its own venv (``scripts/saelens_venv.sh`` builds ``.venv-saelens``) so its dependency tree never
touches streamd's; the check runs there as a subprocess and hands tensors back through safetensors files.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamd.run.checkpoints import CheckpointStore
from streamd.client.load import load_sae
from streamd.sae import ARCHITECTURES
from tests.test_checkpoints import HOOK
from tests.test_pull import D_IN, export, trained_like

SAELENS_PY = Path(__file__).resolve().parents[1] / ".venv-saelens" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not SAELENS_PY.exists(), reason=f"{SAELENS_PY} missing; build it with scripts/saelens_venv.sh"
)

# Runs inside .venv-saelens: load every SAE dir with SAELens, encode/decode the shared input, save the results.
SAELENS_SCRIPT = """
import json, sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE
ckpt, inp, out = sys.argv[1:4]
x = load_file(inp)["x"]
results, info = {}, {}
for name in json.load(open(f"{ckpt}/manifest.json"))["saes"]:
    sae = SAE.load_from_disk(f"{ckpt}/{name}")
    f = sae.encode(x)
    results[f"{name}.f"] = f.detach().contiguous()
    results[f"{name}.x_hat"] = sae.decode(f).detach().contiguous()
    info[name] = {"class": type(sae).__name__, "hook_name": sae.cfg.metadata.hook_name, "d_sae": sae.cfg.d_sae}
save_file(results, out)
print(json.dumps(info))
"""


def test_saelens_loads_and_matches_streamd(tmp_path: Path) -> None:
    saes = {arch: trained_like(arch) for arch in ARCHITECTURES}
    store = CheckpointStore(tmp_path / "run", keep_last=1)
    ckpt = store.write(4096, [export(s) for s in saes.values()], {}, {}, {"model_name": "tiny"}, HOOK)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(3)) * 3
    save_file({"x": x}, tmp_path / "x.safetensors")

    proc = subprocess.run(
        [str(SAELENS_PY), "-c", SAELENS_SCRIPT, str(ckpt), str(tmp_path / "x.safetensors"), str(tmp_path / "y.st")],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = load_file(tmp_path / "y.st")

    expected_class = {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}
    for arch in saes:
        assert info[arch] == {"class": expected_class[arch], "hook_name": HOOK, "d_sae": 4 * D_IN}
        ours = load_sae(ckpt, sae=arch)
        with torch.no_grad():
            f = ours.encode(x)
            assert f.count_nonzero() > 0, arch
            torch.testing.assert_close(theirs[f"{arch}.f"], f, rtol=1e-4, atol=1e-5, msg=f"{arch} encode")
            torch.testing.assert_close(theirs[f"{arch}.x_hat"], ours.decode(f), rtol=1e-4, atol=1e-5, msg=arch)
