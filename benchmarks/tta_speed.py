"""Time test-time adaptation per image against plain inference, in one run on the same inputs.

    python benchmarks/tta_speed.py --device cpu --image_size 256 --batch_size 1 --repeats 10

Prints ms per image for: plain inference (source model, eval mode), a TENT step + prediction, GraTa with the
six weak views in one batched forward, and GraTa with the views forwarded one by one, each with its ratio to
plain inference. The network is the bundle's ResUNet-34 with random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

from monai_grata.networks import resunet
from monai_grata.tta import GraTa, Tent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_image(step: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], warmup: int) -> float:
    """Median over ``images`` of the seconds per image of ``step`` (after ``warmup`` untimed calls)."""
    device = images[0].device
    for x in images[:warmup]:
        step(x)
    times = []
    for x in images:
        _sync(device)
        start = time.perf_counter()
        step(x)
        _sync(device)
        times.append((time.perf_counter() - start) / x.shape[0])
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed images per method")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    source = resunet().to(device).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = [torch.rand(shape, device=device) for _ in range(args.repeats)]

    def fresh() -> torch.nn.Module:
        net = resunet().to(device)
        net.load_state_dict(state)
        return net

    @torch.no_grad()
    def plain(x: torch.Tensor) -> torch.Tensor:
        return source(x)

    methods = {
        "plain inference": plain,
        "TENT (entropy step + predict)": Tent(fresh()),
        "GraTa (batched views)": GraTa(fresh()),
        "GraTa (views one by one)": GraTa(fresh(), batch_views=False),
    }
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}), "
        f"threads={torch.get_num_threads()}, torch={torch.__version__}, image={args.image_size}, "
        f"batch={args.batch_size}, timed images={args.repeats} (median)"
    )
    baseline = None
    print(f"{'method':34s} {'ms/image':>10s} {'x plain':>8s}")
    for name, step in methods.items():
        seconds = time_per_image(step, images, args.warmup)
        baseline = baseline or seconds
        print(f"{name:34s} {1000 * seconds:10.1f} {seconds / baseline:8.2f}")


if __name__ == "__main__":
    main()
