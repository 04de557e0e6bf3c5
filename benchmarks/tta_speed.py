"""Time test-time adaptation per image against plain inference, in one run on the same inputs.

    python benchmarks/tta_speed.py --device cpu --image_size 256 --batch_size 1 --repeats 10

Prints ms per image for: plain inference (source model, eval mode), a TENT step + prediction, GraTa with the
six weak views in one batched forward, and GraTa with the views forwarded one by one, each with its ratio to
plain inference. The network is the bundle's ResUNet-34 with random weights (speed does not depend on them).

With ``--breakdown`` (CPU only) it then profiles the batched GraTa steps with ``torch.profiler`` and splits a
step into the phases Algorithm 1 is made of (the ``record_function`` ranges in ``monai_grata.tta``), each in ms
and in units of plain inference.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

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


# (label, profiler range, range nested inside it whose time is not part of this phase)
PHASES = (
    ("entropy forward + gradient at θ", "grata/aux_gradient", None),
    ("teacher: 6 weak views at θ' (no grad)", "grata/teacher", None),
    ("strong view forward + gradient at θ'", "grata/pseudo_gradient", "grata/teacher"),
    ("restore θ, cos, Adam step", "grata/update", None),
    ("prediction with the updated model", "tta/predict", None),
)


def profiled_seconds_per_image(step: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor]) -> tuple:
    """Seconds per image of ``step`` over ``images`` under ``torch.profiler``, and the profiler's event totals."""
    step(images[0])
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in images:
            step(x)
    n_images = sum(x.shape[0] for x in images)
    return (time.perf_counter() - start) / n_images, {
        e.key: e.cpu_time_total / 1e6 / n_images for e in prof.key_averages()
    }


def phase_breakdown(step: GraTa, plain: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor]) -> None:
    """Print the ms per image of each phase of a GraTa step, and its ratio to plain inference, both profiled
    (the profiler's per-operator overhead slows both alike)."""
    plain_seconds, _ = profiled_seconds_per_image(plain, images)
    step_seconds, totals = profiled_seconds_per_image(step, images)
    print("\nGraTa (batched views) step split into phases, under torch.profiler (plain inference profiled alike):")
    print(f"{'phase':40s} {'ms/image':>10s} {'x plain':>8s}")
    rows = [("plain inference (profiled)", plain_seconds)]
    for label, name, nested in PHASES:
        rows.append((label, totals.get(name, 0.0) - (totals.get(nested, 0.0) if nested else 0.0)))
    rows.append(("rest (input check, rollback guard, ...)", step_seconds - sum(s for _, s in rows[1:])))
    rows.append(("whole GraTa step (profiled)", step_seconds))
    for label, seconds in rows:
        print(f"{label:40s} {1000 * seconds:10.1f} {seconds / plain_seconds:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed images per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="also split a GraTa step into its phases (CPU)")
    args = parser.parse_args()
    if args.breakdown and torch.device(args.device).type != "cpu":
        parser.error("--breakdown times host-side profiler ranges, which only measure compute on the CPU")

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
    if args.breakdown:
        phase_breakdown(methods["GraTa (batched views)"], plain, images)


if __name__ == "__main__":
    main()
