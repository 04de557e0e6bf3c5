"""Time test-time adaptation per image against plain inference, in one run on the same inputs.

    python benchmarks/tta_speed.py --device cpu --image_size 256 --batch_size 1 --repeats 10

Prints ms per image for: plain inference (source model, eval mode), a TENT step + prediction, GraTa with the
six weak views in one batched forward, GraTa with the views forwarded one by one, and one training step of the
source network (forward + backward of all parameters, Dice + BCE as train.json trains), each with its ratio to
plain inference. The network is the bundle's ResUNet-34 with random weights (speed does not depend on them).

On CUDA it then measures each method's peak GPU memory (``torch.cuda.max_memory_allocated``): what the method
keeps allocated (network, the adapter's copy of the source state, optimizer state) plus the most one call on one
batch allocates on top, relative to plain inference and to the training step. ``--json FILE`` also writes all
numbers, with the device, torch and CUDA versions and the date.

``--methods NAME ...`` (or ``all``) also times those registered adapters (``monai_grata.tta.adapter_names()``,
each with its defaults; the baselines of Table 1) or presets (``monai_grata.tta.PRESETS``, e.g. ``grata_gated``,
with their options), so ``docs/results.md`` has a speed column from one run.

With ``--breakdown`` (CPU only) it then profiles the batched GraTa steps with ``torch.profiler`` and splits a
step into the phases Algorithm 1 is made of (the ``record_function`` ranges in ``monai_grata.tta``), each in ms
and in units of plain inference.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from collections.abc import Callable

import torch
from monai.losses import DiceFocalLoss
from torch.profiler import ProfilerActivity, profile

from monai_grata.networks import resunet
from monai_grata.tta import GraTa, Tent, adapter_names, build_adapter, resolve_method

PLAIN, TRAIN = "plain inference", "training step (fwd+bwd, Dice+BCE)"


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


class TrainingStep:
    """One training step of ``network`` without the optimizer update: forward, Dice + BCE against ``label``
    (``DiceFocalLoss`` with gamma 0, as ``train.json``), backward into the gradients of all parameters, which
    are then dropped (so they count in the call's memory, not in what stays allocated)."""

    def __init__(self, network: torch.nn.Module, label: torch.Tensor) -> None:
        self.network, self.label = network.train(), label
        self.loss = DiceFocalLoss(sigmoid=True, include_background=True, gamma=0.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.loss(self.network(x), self.label.expand(x.shape[0], -1, -1, -1))
        loss.backward()
        self.network.zero_grad(set_to_none=True)
        return loss.detach()


def peak_memory(build: Callable[[], Callable], x: torch.Tensor) -> dict[str, float]:
    """Bytes that the method built by ``build`` keeps allocated on ``x``'s CUDA device (``resident``) and the
    most that one call on ``x`` allocates on top (``working``), after one untimed call (Adam's state included)."""
    device = x.device
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    step = build()
    step(x)
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device) - start
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(x)
    torch.cuda.synchronize(device)
    working = torch.cuda.max_memory_allocated(device) - before
    del step
    return {"resident": resident, "working": working, "peak": resident + working}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed images per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="also split a GraTa step into its phases (CPU)")
    parser.add_argument("--methods", nargs="*", default=[], help="also time these adapters or presets ('all')")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.breakdown and torch.device(args.device).type != "cpu":
        parser.error("--breakdown times host-side profiler ranges, which only measure compute on the CPU")

    device = torch.device(args.device)
    torch.manual_seed(0)
    source = resunet().to(device).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = [torch.rand(shape, device=device) for _ in range(args.repeats)]
    label = (torch.rand((1, 2, args.image_size, args.image_size), device=device) > 0.5).float()

    def fresh() -> torch.nn.Module:
        net = resunet().to(device)
        net.load_state_dict(state)
        return net

    def plain_on(network: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        network.eval()

        @torch.no_grad()
        def plain(x: torch.Tensor) -> torch.Tensor:
            return network(x)

        return plain

    builders: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        PLAIN: lambda: plain_on(fresh()),
        "TENT (entropy step + predict)": lambda: Tent(fresh()),
        "GraTa (batched views)": lambda: GraTa(fresh()),
        "GraTa (views one by one)": lambda: GraTa(fresh(), batch_views=False),
        TRAIN: lambda: TrainingStep(fresh(), label),
    }
    for method in adapter_names() if args.methods == ["all"] else args.methods:
        name, options = resolve_method(method)  # a preset (default, grata_gated, ...) with its options
        builders[f"{method} (adapt + predict)"] = lambda n=name, o=options: build_adapter(n, fresh(), **o)
    header = {
        "device": str(device),
        "device_name": device_description(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "date": datetime.date.today().isoformat(),
    }
    print(
        f"device={device} ({header['device_name']}), threads={header['threads']}, torch={torch.__version__}, "
        f"image={args.image_size}, batch={args.batch_size}, timed images={args.repeats} (median), {header['date']}"
    )
    plain = plain_on(source)
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    print(f"{'method':34s} {'ms/image':>10s} {'x plain':>8s}")
    for name, build in builders.items():  # plain inference first: the others' ratios refer to it
        step = plain if name == PLAIN else build()
        seconds[name] = time_per_image(step, images, args.warmup)
        del step
        rows[name] = {"ms_per_image": 1000 * seconds[name], "x_plain": seconds[name] / seconds[PLAIN]}
        print(f"{name:34s} {rows[name]['ms_per_image']:10.1f} {rows[name]['x_plain']:8.2f}")
    if args.breakdown:
        phase_breakdown(GraTa(fresh()), plain, images)
    if device.type == "cuda":
        print("\nPeak GPU memory: what the method keeps allocated + the most one call allocates on top")
        print(f"{'method':34s} {'resident MiB':>12s} {'call MiB':>9s} {'peak MiB':>9s} {'x plain':>8s} {'x train':>8s}")
        memory = {name: peak_memory(build, images[0]) for name, build in builders.items()}
        for name, m in memory.items():
            ratios = {
                "peak_x_plain": m["peak"] / memory[PLAIN]["peak"],
                "peak_x_train": m["peak"] / memory[TRAIN]["peak"],
            }
            rows[name].update({f"{k}_mib": v / 2**20 for k, v in m.items()} | ratios)
            print(
                f"{name:34s} {m['resident'] / 2**20:12.1f} {m['working'] / 2**20:9.1f} {m['peak'] / 2**20:9.1f} "
                f"{ratios['peak_x_plain']:8.2f} {ratios['peak_x_train']:8.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "methods": rows}, f, indent=1)


if __name__ == "__main__":
    main()
