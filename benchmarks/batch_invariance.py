"""Batch/padding invariance of ``SLQModel.encode`` per dtype: each row of a mixed, padded batch vs that input alone.

    python benchmarks/batch_invariance.py
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["qwen3_vl", "llava", "gemma3"], help="tiny families")
    args = parser.parse_args()
    from slq_hf import SLQModel
    from slq_hf.testing.tiny_backbones import build_tiny_backbone

    inputs = ["a red square", "a much longer caption about a blue circle in the top left corner of the picture",
              Image.new("RGB", (64, 48), (200, 20, 20)), Image.new("RGB", (300, 100), (20, 200, 20)),
              {"image": Image.new("RGB", (96, 64), (20, 20, 200)), "text": "what shape?"}]
    print("| family | dtype | max abs difference, batch row vs alone |")
    print("|---|---|---|")
    for family in args.families:
        folder = tempfile.mkdtemp(prefix=f"slq_inv_{family}_")
        build_tiny_backbone(family, folder)
        for dtype in (torch.float32, torch.bfloat16):
            model = SLQModel.from_backbone(folder, num_queries=8, dtype=dtype)
            with torch.no_grad():
                torch.nn.init.normal_(model.queries, std=0.5)
            together = model.encode(inputs, batch_size=len(inputs))
            alone = torch.cat([model.encode([value]) for value in inputs])
            print(f"| {family} | {str(dtype).removeprefix('torch.')} | {(together - alone).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()
