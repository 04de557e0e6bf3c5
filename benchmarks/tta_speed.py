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
and in units of plain inference; every GraTa among ``--methods`` (e.g. ``default``: three updates and the gate) is
split the same way, per image.

``--stream`` times a stream instead: each method adapts continually over ``--max_images`` images, called image by
image from its fresh state, and its total time over the stream is divided by the number of images, so images on
which a method leaves out its update (a shut gate, a settled stream) count at what they cost. Plain inference runs
over the same images first. The images are a target domain's (``--dataset_dir`` and ``--target``, preprocessed as
``inference.json`` does) adapted from the shipped source model (``--ckpt``), or random images when no dataset is
given. ``--methods`` takes presets, registered names and specs with options (``grata:steps=3,reuse_teacher=true``,
as ``python -m monai_grata.benchmark --methods`` takes them); the table reports on how many images each adapter
updated. For example::

    python benchmarks/tta_speed.py --stream --dataset_dir $DATA_DIR/fundus --target drishti_gs --max_images 100 \
        --methods default "grata:bn_prior=256,beta=0.001,steps=3,min_shift=0.18,reuse_teacher=true"
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceFocalLoss
from torch.profiler import ProfilerActivity, profile

from monai_grata.benchmark.cells import parse_method
from monai_grata.data import fundus_preprocessing, target_datalist
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import GraTa, Tent, adapter_names, build_adapter, calibrated_options

PLAIN, TRAIN = "plain inference", "training step (fwd+bwd, Dice+BCE)"
#: the shipped source model (the bundle's, beside this script's folder)
SHIPPED_CKPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "grata", "models", "source_refuge_train.pt"
)


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
    ("gate: separate shift forward", "grata/shift", None),
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


def phase_breakdown(
    step: GraTa, plain: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor], name: str = "GraTa"
) -> None:
    """Print the ms per image of each phase of a GraTa step, and its ratio to plain inference, both profiled
    (the profiler's per-operator overhead slows both alike)."""
    plain_seconds, _ = profiled_seconds_per_image(plain, images)
    step_seconds, totals = profiled_seconds_per_image(step, images)
    print(f"\n{name} per image split into phases, under torch.profiler (plain inference profiled alike):")
    print(f"{'phase':40s} {'ms/image':>10s} {'x plain':>8s}")
    rows = [("plain inference (profiled)", plain_seconds)]
    for label, range_name, nested in PHASES:
        if range_name in totals:  # a phase the method has (the separate gate forward only with aux="consistency")
            rows.append((label, totals[range_name] - (totals.get(nested, 0.0) if nested else 0.0)))
    rows.append(("rest (input check, rollback guard, ...)", step_seconds - sum(s for _, s in rows[1:])))
    rows.append(("whole adaptation + prediction (profiled)", step_seconds))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed images per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="also split a GraTa step into its phases (CPU)")
    parser.add_argument("--methods", nargs="*", default=[], help="also time these adapters, presets or specs ('all')")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    stream = parser.add_argument_group("stream mode")
    stream.add_argument("--stream", action="store_true", help="time each method over a stream, image by image")
    stream.add_argument("--dataset_dir", default=None, help="the dataset root (none: random images)")
    stream.add_argument("--target", default=None, help="the target domain (none: every domain but --source)")
    stream.add_argument("--source", default="refuge_train", help="the source domain, left out without --target")
    stream.add_argument("--datalist", default=None, help="a datalist JSON (default: DATASET_DIR/datalist.json)")
    stream.add_argument("--max_images", type=int, default=100, help="images in the stream")
    stream.add_argument("--ckpt", default=SHIPPED_CKPT, help="the source model ('none': random weights)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark the command line ``argv`` asks for; return what ``--json`` writes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.breakdown and torch.device(args.device).type != "cpu":
        parser.error("--breakdown times host-side profiler ranges, which only measure compute on the CPU")
    if args.stream and args.breakdown:
        parser.error("--breakdown profiles fixed inputs: run it without --stream")
    results = stream_benchmark(args) if args.stream else fixed_inputs_benchmark(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def run_header(args: argparse.Namespace, device: torch.device) -> dict:
    return {
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


def plain_on(network: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain inference with ``network`` in eval mode, without gradients."""
    network.eval()

    @torch.no_grad()
    def plain(x: torch.Tensor) -> torch.Tensor:
        return network(x)

    return plain


def fixed_inputs_benchmark(args: argparse.Namespace) -> dict:
    """Time every method on the same ``--repeats`` random images (median per image); return the results."""
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

    builders: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        PLAIN: lambda: plain_on(fresh()),
        "TENT (entropy step + predict)": lambda: Tent(fresh(), multilabel=True),
        "GraTa (batched views)": lambda: GraTa(fresh(), multilabel=True),
        "GraTa (views one by one)": lambda: GraTa(fresh(), multilabel=True, batch_views=False),
        TRAIN: lambda: TrainingStep(fresh(), label),
    }
    method_rows = []
    for method in adapter_names() if args.methods == ["all"] else args.methods:
        spec = parse_method(method)  # a preset (default, grata_gated, ...) with its options, or name:key=value,...
        method_rows.append(f"{method} (adapt + predict)")
        # random weights: a calibrated gate takes the shipped model's threshold (only the cost is measured here)
        options = calibrated_options(spec.options, SHIPPED_CKPT)
        builders[method_rows[-1]] = lambda s=spec, o=options: build_adapter(s.name, fresh(), task="fundus", **o)
    header = run_header(args, device)
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
        phase_breakdown(GraTa(fresh(), multilabel=True), plain, images, "GraTa (batched views, one update)")
        for name in method_rows:
            step = builders[name]()
            if isinstance(step, GraTa):
                phase_breakdown(step, plain, images, name)
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
    return {**header, "methods": rows}


def stream_images(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """The stream's images as (1, C, H, W) tensors on ``device``: the target's first ``--max_images``, preprocessed
    as ``inference.json`` does, or as many random images without ``--dataset_dir``."""
    if args.dataset_dir is None:
        generator = torch.Generator().manual_seed(0)
        shape = (1, 3, args.image_size, args.image_size)
        return [torch.rand(shape, generator=generator).to(device) for _ in range(args.max_images)]
    items = target_datalist(args.dataset_dir, args.target, args.source, args.datalist)[: args.max_images]
    transform = fundus_preprocessing(image_size=args.image_size, resize_label=False)
    return [transform({"image": item["image"]})["image"].as_tensor()[None].to(device) for item in items]


def source_network(ckpt: str, device: torch.device) -> Callable[[], torch.nn.Module]:
    """A builder of fresh copies of the source model: ``ckpt``'s weights, or (``"none"``) random weights."""
    torch.manual_seed(0)
    decoder = "flexible" if ckpt.lower() == "none" else checkpoint_decoder(ckpt)
    network = resunet(decoder=decoder)
    if ckpt.lower() != "none":
        load_weights(network, ckpt)
    state = {k: v.clone() for k, v in network.state_dict().items()}

    def fresh() -> torch.nn.Module:
        net = resunet(decoder=decoder)
        net.load_state_dict(state)
        return net.to(device)

    return fresh


def time_stream(step: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor]) -> float:
    """Seconds per image of ``step`` called on ``images`` one after the other, end to end."""
    device = images[0].device
    _sync(device)
    start = time.perf_counter()
    for x in images:
        step(x)
    _sync(device)
    return (time.perf_counter() - start) / len(images)


def stream_benchmark(args: argparse.Namespace) -> dict:
    """Time plain inference and each of ``--methods`` (default: ``default``) over one stream; return the results."""
    device = torch.device(args.device)
    images = stream_images(args, device)
    if not images:
        raise ValueError("the stream is empty: check --dataset_dir, --target and --max_images")
    fresh = source_network(args.ckpt, device)
    header = run_header(args, device) | {
        "stream": args.target or ("random" if args.dataset_dir is None else "all targets"),
        "images": len(images),
        "ckpt": args.ckpt,
    }
    print(
        f"device={device} ({header['device_name']}), threads={header['threads']}, torch={torch.__version__}, "
        f"image={args.image_size}, stream={header['stream']} ({len(images)} images, end to end), {header['date']}"
    )
    plain = plain_on(fresh())
    plain(images[0])  # warm-up: the first call sets up the kernels
    rows: dict[str, dict] = {PLAIN: {"ms_per_image": 1000 * time_stream(plain, images), "x_plain": 1.0}}
    methods = args.methods or ["default"]
    width = max(len(PLAIN), *map(len, methods))
    print(f"{'method':{width}s} {'ms/image':>10s} {'x plain':>8s} {'updated':>9s}")
    print(f"{PLAIN:{width}s} {rows[PLAIN]['ms_per_image']:10.1f} {1.0:8.2f} {'-':>9s}")
    for method in methods:
        spec = parse_method(method)
        options = calibrated_options(spec.options, args.ckpt if args.ckpt.lower() != "none" else SHIPPED_CKPT)
        adapter = build_adapter(spec.name, fresh(), task="fundus", **options)
        seconds = time_stream(adapter, images)
        updated = getattr(adapter, "n_updated", None)
        rows[method] = {
            "spec": spec.label,
            "ms_per_image": 1000 * seconds,
            "x_plain": 1000 * seconds / rows[PLAIN]["ms_per_image"],
            "updated_images": updated,
        }
        shown = "-" if updated is None else f"{updated}/{len(images)}"
        print(f"{method:{width}s} {rows[method]['ms_per_image']:10.1f} {rows[method]['x_plain']:8.2f} {shown:>9s}")
        del adapter
    return {**header, "methods": rows}


if __name__ == "__main__":
    main()
