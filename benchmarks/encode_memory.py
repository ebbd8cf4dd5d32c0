"""Peak memory of ``SLQModel.encode`` vs batch size and number of inputs: images are decoded batch by batch.

Each configuration runs in a fresh subprocess (peak RSS is per process) on the tiny Qwen3-VL backbone, with JPEG
files on disk as inputs. ``lazy`` is the public ``model.encode(paths)``; ``eager`` is the same work with every image
decoded before the first batch (``to_items(paths, lazy=False)`` + ``collate``), which is what encode did before.

    python benchmarks/encode_memory.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from slq_hf import SLQModel
from slq_hf.processing import collate, image_budget, to_items
backbone, folder, count, batch_size, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
paths = sorted(str(p) for p in __import__("pathlib").Path(folder).glob("*.jpg"))[:count]
model = SLQModel.from_backbone(backbone, num_queries=8)
model.encode(["warm up"])
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
base = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak, so only the encode call is measured
if method == "lazy":
    out = model.encode(paths, batch_size=batch_size)
else:
    items = to_items(paths, image_budget(model.processor), lazy=False)
    with torch.inference_mode():
        out = torch.cat([model(**collate(model.processor, items[s : s + batch_size])).pooler_output
                         for s in range(0, len(items), batch_size)])
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"peak_mib": peak, "base_mib": base, "rows": out.shape[0]}))
"""


def make_images(folder: Path, count: int, width: int, height: int) -> None:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    rng = np.random.default_rng(0)
    tile = rng.integers(0, 255, (height, width, 3), dtype="uint8")
    for index in tqdm(range(count), desc="writing JPEGs"):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            Image.fromarray(np.roll(tile, index, axis=1)).save(path, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="number of JPEG inputs (default 2000)")
    parser.add_argument("--small", type=int, default=200, help="the smaller input count compared (default 200)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 600), metavar=("W", "H"),
                        help="JPEG size in pixels (default 800 600)")
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(8, 64), help="two batch sizes (default 8 64)")
    parser.add_argument("--work-dir", default=None, help="where to keep the backbone and images (default: temp)")
    args = parser.parse_args()

    from slq_hf.testing.tiny_backbones import build_tiny_backbone

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="slq_encode_memory_"))
    (work / "images").mkdir(parents=True, exist_ok=True)
    if not (work / "backbone" / "config.json").exists():
        build_tiny_backbone("qwen3_vl", work / "backbone")
    make_images(work / "images", args.images, *args.size)
    small, large = args.batch_sizes
    runs = [("lazy", args.images, small), ("lazy", args.images, large), ("lazy", args.small, small),
            ("eager", args.images, small)]
    rows = []
    for method, count, batch_size in runs:
        result = subprocess.run([sys.executable, "-c", WORKER, str(work / "backbone"), str(work / "images"),
                                 str(count), str(batch_size), method], capture_output=True, text=True, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append((method, count, batch_size, measured["peak_mib"] - measured["base_mib"]))
        print(f"{method:5s} inputs={count:5d} batch={batch_size:3d}: peak +{rows[-1][3]:.0f} MiB", flush=True)
    reference = rows[0][3]
    print(f"\n{args.size[0]}x{args.size[1]} JPEGs, tiny Qwen3-VL (16,384-pixel image budget), peak RSS above the "
          "loaded model, one process per row:\n")
    print("| decoding | inputs | batch size | peak RSS increase | vs the first row |")
    print("|---|---|---|---|---|")
    for method, count, batch_size, mib in rows:
        name = "batch by batch (`encode`)" if method == "lazy" else "all before the first batch (old)"
        print(f"| {name} | {count:,} | {batch_size} | +{mib:.0f} MiB | {mib / reference:.2f}x |")


if __name__ == "__main__":
    main()
