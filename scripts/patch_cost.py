"""Time and peak memory of one GraTa step on a whole volume against PatchAdaptation's step on patches of it, with the
spinal-cord bundle's network (2D U-Net run slice by slice), for docs/volumes.md.

    python scripts/patch_cost.py --sizes 160 320 --depth 20 --roi 96 --num_patches 4

Every measurement runs in its own process, so its peak resident memory (``ru_maxrss``) is its own: a fresh process
builds the network, then adapts once (whole volume, or patches plus the statistics forward and the sliding-window
prediction). Timings are wall-clock on whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(mode: str, size: int, depth: int, roi: int, num_patches: int) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import UNet

    from monai_grata.networks.slicewise import SliceWise
    from monai_grata.transforms import StrongIntensityAug, weak_views
    from monai_grata.tta import GraTa, PatchAdaptation

    torch.manual_seed(0)
    net = SliceWise(UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch"))
    views = weak_views(3, flip_axes=(-3, -2))
    strong = StrongIntensityAug(seed=0, blur_axes=(-3, -2))
    adapter = GraTa(net, multilabel=False, views=views, strong_transform=strong)
    volume = torch.rand(1, 1, size, size, depth)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "whole":
        adapter(volume)
    else:
        inferer = SlidingWindowInferer(roi_size=(roi, roi, -1), sw_batch_size=4, overlap=0.25)
        PatchAdaptation(adapter, (roi, roi, -1), num_patches)(volume, inferer)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "size": size, "depth": depth, "seconds": seconds, "peak_mib": peak / 1024,
            "added_mib": (peak - base) / 1024}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 320])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--num_patches", type=int, default=4)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: mode size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.depth, args.roi, args.num_patches)))
        return
    print("| volume (H x W x D) | adaptation | wall time (s) | peak memory added (MiB) |")
    print("|---|---|---|---|")
    for size in args.sizes:
        for mode in ("whole", "patches"):
            flags = ["--depth", str(args.depth), "--roi", str(args.roi), "--num_patches", str(args.num_patches)]
            out = subprocess.run(
                [sys.executable, __file__, "--one", mode, str(size), *flags], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            what = (
                "whole volume"
                if mode == "whole"
                else f"{args.num_patches} patches of {args.roi}x{args.roi}x{args.depth}"
            )
            print(f"| {size}x{size}x{args.depth} | {what} | {r['seconds']:.1f} | {r['added_mib']:.0f} |")


if __name__ == "__main__":
    main()
