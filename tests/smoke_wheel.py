"""Smoke test of an INSTALLED slq_hf (a wheel or `pip install .`), run from a folder outside the checkout.

    .ci/wheel_smoke.sh          # builds the wheel, makes a fresh venv, installs it, runs this file

This is not a pytest module (its name does not start with ``test_``): it checks what only a regular install can
break: files the package needs at run time must be inside the wheel (modeling code copied into checkpoints, the
model-card template `slq-hf export` renders), the ``slq-hf`` console script must exist and answer, and a saved folder
must load through AutoModel and SentenceTransformer with nothing from the source tree on ``sys.path``.
Exit status 0 = all checks passed; any failure raises with a message naming the step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def step(message: str) -> None:
    print(f"[smoke] {message}", flush=True)


def check_installed_not_checkout() -> Path:
    """slq_hf must come from site-packages, not from a source tree on sys.path (cwd, PYTHONPATH, editable hook)."""
    import slq_hf

    location = Path(slq_hf.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if site not in location.parents:
        raise SystemExit(f"slq_hf was imported from {location}, not from this venv's site-packages {site}: "
                         "run the smoke test from outside the checkout, on a regular (non-editable) install")
    step(f"slq_hf {slq_hf.__version__} imported from {location}")
    return location


def run_cli(*args: str) -> str:
    """Run the installed `slq-hf` console script (the one next to this interpreter), return its stdout."""
    script = Path(sys.executable).with_name("slq-hf")
    if not script.exists():
        raise SystemExit(f"console script {script} missing: [project.scripts] not installed")
    done = subprocess.run([str(script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`slq-hf {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> None:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="slq_smoke_"))
    os.chdir(work)  # nothing in the checkout can shadow the installed package from here
    try:
        check_installed_not_checkout()
        help_text = run_cli("--help")
        for command in ("train", "eval", "export", "push"):
            if command not in help_text:
                raise SystemExit(f"`slq-hf --help` does not list {command!r}:\n{help_text}")
        run_cli("export", "--help")
        step("slq-hf --help and slq-hf export --help answer")

        from transformers import AutoModel

        from slq_hf import SLQModel
        from slq_hf.testing import build_tiny_backbone

        backbone = work / "backbone"
        build_tiny_backbone("qwen3_vl", backbone)
        model = SLQModel.from_backbone(str(backbone), num_queries=4).eval()
        saved = work / "saved"
        model.save_pretrained(saved)
        inputs = ["a red square", Image.new("RGB", (64, 48), (200, 30, 30))]
        reference = model.encode(inputs)  # (2, D)
        step(f"tiny Qwen3-VL SLQ model saved to {saved}, reference embeddings {tuple(reference.shape)}")

        hub = work / "hub"
        run_cli("export", str(saved), "--out", str(hub))
        card = (hub / "README.md").read_text()
        config = json.loads((hub / "config.json").read_text())
        if "slq" not in card.lower() or not (hub / "modeling_slq.py").exists():
            raise SystemExit(f"export wrote an incomplete folder: {sorted(p.name for p in hub.iterdir())}")
        step(f"slq-hf export wrote {len(list(hub.iterdir()))} files (model card {len(card)} chars, "
             f"slq_hf_version {config.get('slq_hf_version')})")

        for trust in (False, True):
            loaded = AutoModel.from_pretrained(hub, trust_remote_code=trust).eval()
            error = (loaded.encode(inputs) - reference).abs().max().item()
            if error > 1e-5:
                raise SystemExit(f"AutoModel.from_pretrained(trust_remote_code={trust}) differs by {error:.2e}")
            step(f"AutoModel.from_pretrained(trust_remote_code={trust}): {type(loaded).__module__}, "
                 f"max |diff| {error:.1e}")

        # The remote-code copy alone (no slq_hf imported in that process): the files export wrote are complete.
        probe = ("import sys, json, torch; from transformers import AutoModel; "
                 f"m = AutoModel.from_pretrained({str(hub)!r}, trust_remote_code=True); "
                 "print(json.dumps([type(m).__module__, 'slq_hf' in sys.modules]))")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"remote-code load of {hub} failed:\n{done.stderr[-3000:]}")
        module, imported = json.loads(done.stdout.strip().splitlines()[-1])
        if not module.startswith("transformers_modules") or imported:
            raise SystemExit(f"remote-code load used {module} (slq_hf imported: {imported}), not the folder's code")
        step(f"AutoModel.from_pretrained(trust_remote_code=True) without slq_hf: {module}")

        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise SystemExit("sentence-transformers is not installed: install the wheel with the "
                             "[sentence-transformers] extra") from err
        st_model = SentenceTransformer(str(hub), trust_remote_code=True, device="cpu")
        st_embeddings = st_model.encode(inputs, convert_to_tensor=True)
        error = (st_embeddings.cpu().float() - reference).abs().max().item()
        if error > 1e-5:
            raise SystemExit(f"SentenceTransformer({hub}) differs from SLQModel.encode by {error:.2e}")
        width = st_model.get_embedding_dimension()
        if width != reference.shape[1]:
            raise SystemExit(f"SentenceTransformer.get_embedding_dimension() = {width}, embeddings are "
                             f"{reference.shape[1]} wide")
        step(f"SentenceTransformer(hub folder).encode: max |diff| {error:.1e}; get_embedding_dimension() {width}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step("all checks passed")


if __name__ == "__main__":
    main()
