"""SLQ in one minute, offline: attach latent queries to a (tiny, random) Qwen3-VL backbone, embed images and texts,
save a queries-only checkpoint and load it back through AutoModel.

    .venv/bin/python examples/quickstart.py [--family qwen3_vl] [--num-queries 8] [--out runs/quickstart]

With a real backbone, replace the tiny folder by a Hub id, e.g. "Qwen/Qwen3-VL-2B-Instruct".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel

import slq_hf  # noqa: F401  (registers "slq" with AutoConfig/AutoModel)
from slq_hf import SLQModel
from slq_hf.testing import TINY_FAMILIES, build_tiny_backbone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen3_vl", choices=sorted(TINY_FAMILIES),
                        help="tiny backbone family to build in code (default: qwen3_vl)")
    parser.add_argument("--num-queries", type=int, default=8, help="number of latent queries (paper: 40)")
    parser.add_argument("--out", default=None, help="where to save the SLQ folder (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="slq_quickstart_"))
    backbone_dir = work / "backbone"
    print(f"1. building a tiny random {args.family} backbone in {backbone_dir}")
    build_tiny_backbone(args.family, backbone_dir)
    model = SLQModel.from_backbone(str(backbone_dir), num_queries=args.num_queries)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"2. SLQ attached: {trainable:,} trainable of {total:,} parameters (backbone frozen)")

    red = Image.new("RGB", (64, 64), (128, 128, 128))
    red.paste((220, 30, 30), (16, 16, 48, 48))
    inputs = ["a red square on a grey background", red, {"image": red, "text": "what shape is this?"}]
    embeddings = model.encode(inputs)
    print(f"3. encoded {len(inputs)} inputs (text, image, image+text) -> {tuple(embeddings.shape)}, "
          f"norms {[round(n, 4) for n in embeddings.norm(dim=-1).tolist()]}")
    print(f"   cosine(text, image) = {embeddings[0] @ embeddings[1]:.4f} (random queries: no meaning yet)")

    out = Path(args.out) if args.out else work / "slq"
    model.save_pretrained(out)
    size = (out / "model.safetensors").stat().st_size
    print(f"4. saved {out}: model.safetensors = {size:,} bytes (queries + temperature only); files: "
          f"{sorted(p.name for p in out.iterdir())}")

    reloaded = AutoModel.from_pretrained(out)
    same = torch.allclose(reloaded.encode(inputs), embeddings, atol=1e-6)
    print(f"5. reloaded with AutoModel.from_pretrained -> {type(reloaded).__name__}; identical embeddings: {same}")
    if not same:
        raise SystemExit("reloaded embeddings differ")


if __name__ == "__main__":
    main()
