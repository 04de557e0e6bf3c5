"""Figure 4 of the GraTa paper, measured: does taking the pseudo (consistency) gradient at θ' = θ − ∇L_aux align
it better with the supervised gradient than taking it at θ?

    python scripts/gradient_alignment.py --dataset_dir $DATA_DIR/fundus \\
        --pairs refuge_train:drishti_gs drishti_gs:refuge_val refuge_val:refuge_train --max_images 30 \\
        --out docs/images/gradient_alignment.png

Along a GraTa stream (the paper's settings, continual, batch size 1) every step also measures, with the label
(offline, never used for the update), cos(∇L_con(θ), ∇L_sup(θ)) and cos(∇L_con(θ'), ∇L_sup(θ)) over the adapted
parameters, where L_sup is the binary cross-entropy with the label and both consistency gradients use the same
strong view. Prints a markdown table (mean cosines, share of steps where θ' aligns better) and saves the plot.
A pair is ``SOURCE:TARGET``; ``--ckpt SOURCE=FILE`` uses another checkpoint for a source (e.g. a retrained model).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from monai_grata.benchmark import load_target, target_items
from monai_grata.networks import checkpoint_decoder, load_weights, resunet
from monai_grata.tta import GraTa, consistency_loss


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(torch.dot(fa, fb) / (fa.norm() * fb.norm() + 1e-12))


def measure_step(adapter: GraTa, x: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """The two cosines of one step, measured at the adapter's current weights θ (restored afterwards)."""
    params = adapter.params
    with torch.enable_grad():
        sup = F.binary_cross_entropy_with_logits(adapter.model(x), label[None])
        g_sup = torch.autograd.grad(sup, params)
        strong = adapter.strong_transform(x)
        g_con = torch.autograd.grad(
            consistency_loss(adapter.model(strong), adapter.teacher(x), adapter.multilabel), params
        )
        g_aux = torch.autograd.grad(adapter.loss(adapter.aux, x), params)
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_sub_(params, g_aux)
        g_con_prime = torch.autograd.grad(
            consistency_loss(adapter.model(strong), adapter.teacher(x), adapter.multilabel), params
        )
        with torch.no_grad():
            for p, t in zip(params, theta, strict=True):
                p.copy_(t)
    return {"cos_theta": _cos(g_con, g_sup), "cos_theta_prime": _cos(g_con_prime, g_sup),
            "aux_to_theta": math.sqrt(sum(float(g.pow(2).sum()) for g in g_aux))
            / math.sqrt(sum(float(t.pow(2).sum()) for t in theta))}  # fmt: skip


def run_pair(args: argparse.Namespace, source: str, target: str, ckpt: str) -> list[dict[str, float]]:
    """Stream the first ``--max_images`` of the target through GraTa, measuring before every step."""
    torch.manual_seed(args.seed)
    images = load_target(target_items(args.dataset_dir, target)[: args.max_images], args.image_size)
    adapter = GraTa(load_weights(resunet(decoder=checkpoint_decoder(ckpt)), ckpt), seed=args.seed, multilabel=True)
    steps = []
    for item in images:
        x = item["image"][None]
        steps.append(measure_step(adapter, x, item["label"]))
        with torch.no_grad():
            adapter(x)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--pairs", nargs="+", required=True, help="SOURCE:TARGET pairs")
    parser.add_argument("--ckpt", nargs="*", default=[], help="SOURCE=FILE: another checkpoint for a source")
    parser.add_argument("--label", nargs="*", default=[], help="SOURCE=NAME: how the table names that model")
    parser.add_argument("--max_images", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/gradient_alignment.png")
    args = parser.parse_args()
    ckpts, names = dict(c.split("=", 1) for c in args.ckpt), dict(n.split("=", 1) for n in args.label)
    results = {}
    for pair in args.pairs:
        source, target = pair.split(":", 1)
        ckpt = ckpts.get(source, f"bundles/grata/models/source_{source}.pt")
        results[f"{names.get(source, source)}→{target}"] = run_pair(args, source, target, ckpt)
    print("| model → target | steps | mean cos(∇L_con(θ), ∇L_sup) | mean cos(∇L_con(θ'), ∇L_sup) | "
          "steps where θ' aligns better | mean ‖∇L_aux‖/‖θ‖ |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, steps in results.items():
        a = [s["cos_theta"] for s in steps]
        b = [s["cos_theta_prime"] for s in steps]
        better = sum(y > x for x, y in zip(a, b, strict=True))
        ratio = sum(s["aux_to_theta"] for s in steps) / len(steps)
        print(f"| {name} | {len(steps)} | {sum(a) / len(a):+.4f} | {sum(b) / len(b):+.4f} | "
              f"{better}/{len(steps)} | {ratio:.2e} |")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (name, steps) in zip(axes[0], results.items(), strict=True):
        ax.plot([s["cos_theta"] for s in steps], label="cos(∇L_con(θ), ∇L_sup)")
        ax.plot([s["cos_theta_prime"] for s in steps], "--", label="cos(∇L_con(θ'), ∇L_sup)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("test image")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
