"""Backbone memory footprint: fp32 vs bf16 vs 4-bit NF4 (bitsandbytes CPU backend), with SLQ attached.

Each variant loads the same saved bench backbone from disk in its own subprocess, so RSS numbers do not mix.
Reports `get_memory_footprint()` (parameters + buffers), the process's peak RSS after one encode, the trainable
query bytes (always fp32), and the cosine similarity of each variant's embeddings to the fp32 ones.

    .venv/bin/python benchmarks/backbone_memory.py [--text-hidden 640 --text-layers 8] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("fp32", "bf16", "nf4")


def _child(path: str, variant: str, out: str) -> None:
    import torch
    from PIL import Image
    from transformers import BitsAndBytesConfig

    from slq_hf import SLQModel

    torch.manual_seed(0)
    kwargs = {
        "fp32": {"dtype": torch.float32},
        "bf16": {"dtype": torch.bfloat16},
        "nf4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=torch.bfloat16)},
    }[variant]
    model = SLQModel.from_backbone(path, num_queries=40, **kwargs)
    inputs = ["a red square on a grey background", "an animal with nine lives",
              Image.new("RGB", (224, 224), (200, 30, 30))]
    emb = model.encode(inputs)
    result = {
        "variant": variant,
        "footprint_mib": model.backbone.get_memory_footprint() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "query_bytes": model.queries.numel() * model.queries.element_size(),
        "query_dtype": str(model.queries.dtype),
        "embeddings": emb.tolist(),
    }
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-hidden", type=int, default=640, help="text model width of the bench backbone")
    parser.add_argument("--text-layers", type=int, default=8, help="text model depth of the bench backbone")
    parser.add_argument("--write", type=Path, metavar="BENCHMARKS.md",
                        help="also replace the 4bit section of this markdown file with the table")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import build_bench_qwen3_vl, write_section

    with tempfile.TemporaryDirectory() as tmp:
        backbone = Path(tmp) / "backbone"
        build_bench_qwen3_vl(backbone, text_hidden=args.text_hidden, text_layers=args.text_layers)
        results = {}
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.json"
            subprocess.run([sys.executable, __file__, "--child", str(backbone), variant, str(out)], check=True)
            results[variant] = json.loads(out.read_text())
    reference = torch.tensor(results["fp32"]["embeddings"])
    lines = [
        f"bench backbone: Qwen3-VL text {args.text_hidden} x {args.text_layers} layers, 40 queries",
        "",
        "| backbone dtype | footprint (MiB) | vs fp32 | peak RSS (MiB) | queries | min cos to fp32 embeddings |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        r = results[variant]
        cos = torch.nn.functional.cosine_similarity(torch.tensor(r["embeddings"]), reference).min().item()
        lines.append(f"| {variant} | {r['footprint_mib']:.1f} | "
                     f"{r['footprint_mib'] / results['fp32']['footprint_mib']:.2f}x | {r['peak_rss_mib']:.0f} | "
                     f"{r['query_bytes'] / 1024:.0f} KiB {r['query_dtype']} | {cos:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args.write, "4bit", SECTION_TEMPLATE.format(table=table))


SECTION_TEMPLATE = """## Backbone memory: fp32 vs bf16 vs 4-bit NF4 (issue 2)

`.venv/bin/python benchmarks/backbone_memory.py --write BENCHMARKS.md` — a CPU-sized Qwen3-VL (text 640 x 8 layers,
vision 256 x 4, random weights, real classes) saved to disk and loaded three ways, each in its own process, with 40
fp32 queries attached; 2 text + 1 image prompt encoded.

{table}

Footprint is `get_memory_footprint()` (parameters + buffers). Peak RSS is dominated by the torch/CUDA-build runtime
(~0.9 GiB before any model) and bitsandbytes' own import, so it does not show the weight savings at this size; the
footprint column does. The cosine column is on random weights (no trained structure to preserve), so it bounds the
quantisation noise rather than measuring retrieval quality. Queries stay fp32 in every variant."""


if __name__ == "__main__":
    main()
