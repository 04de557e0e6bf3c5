"""Our Table 1 beside the paper's: each method's average mean Dice over the shifted pairs of a benchmark store, its
change against No Adapt, the pairs where it beats No Adapt and its rank among the methods both tables hold, beside
the average, change and rank the GraTa paper reports (its Table 1: five other fundus domains, 512 px, DSC in %);
Spearman's rank correlation of the two orderings.

    python scripts/table1_vs_paper.py /root/stage/table1

The paper's numbers are copied from the GraTa paper (AAAI 2025, Table 1, "Average" column); ours are read
from the store with :func:`monai_grata.benchmark.compare.records_from_store`.
"""

from __future__ import annotations

import argparse

from scipy.stats import spearmanr

from monai_grata.benchmark import summarise
from monai_grata.benchmark.compare import records_from_store

#: the paper's Table 1, average DSC (%) over its five target domains
PAPER_AVERAGE = {
    "none": 68.47, "dua": 71.43, "diga": 72.18, "medbn": 71.65, "tent": 69.65, "dltta": 71.78,
    "domainadaptor": 72.00, "sar": 72.67, "detta": 72.69, "grata": 74.34,
}  # fmt: skip
METHODS = ("none", "norm", "tent", "grata", "dua", "diga", "medbn", "dltta", "domainadaptor", "sar", "detta")


def ranks(values: dict[str, float]) -> dict[str, int]:
    """1 for the largest value, 2 for the next, ... (ties broken by the order given)."""
    order = sorted(values, key=lambda k: -values[k])
    return {k: order.index(k) + 1 for k in values}


def compare_with_paper(summary: dict, baseline: str = "none") -> tuple[str, float, int]:
    """The markdown table, Spearman's rho over the methods in both tables, and how many those are.

    Args:
        summary: :func:`monai_grata.benchmark.summarise` of the store's cells.
        baseline: the method the changes are taken against.
    """
    ours = {m: summary["average"][m][0] for m in summary["methods"] if m in summary["average"]}
    if baseline not in ours:
        raise ValueError(f"the store has no complete {baseline!r} row to compare with")
    shared = [m for m in ours if m in PAPER_AVERAGE]
    our_rank, paper_rank = ranks({m: ours[m] for m in shared}), ranks({m: PAPER_AVERAGE[m] for m in shared})
    lines = [
        "| method | ours: average | Δ vs No Adapt | pairs above No Adapt | rank | paper: average (%) | Δ | rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, average in ours.items():
        wins = sum(
            summary["cells"][(method, p)]["dice_mean"][0] > summary["cells"][(baseline, p)]["dice_mean"][0]
            for p in summary["shift_pairs"]
        )
        paper = ["–", "–", "–"]
        if method in PAPER_AVERAGE:
            change = PAPER_AVERAGE[method] - PAPER_AVERAGE[baseline]
            paper = [f"{PAPER_AVERAGE[method]:.2f}", f"{change:+.2f}", str(paper_rank[method])]
        row = [method, f"{average:.4f}", f"{average - ours[baseline]:+.4f}", f"{wins} of {len(summary['shift_pairs'])}"]
        lines.append("| " + " | ".join([*row, str(our_rank.get(method, "–")), *paper]) + " |")
    rho = spearmanr([ours[m] for m in shared], [PAPER_AVERAGE[m] for m in shared]).statistic
    return "\n".join(lines) + "\n", float(rho), len(shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locations", nargs="+", help="benchmark stores (tracking URIs, .db files or folders)")
    parser.add_argument("--filter", default="", help="an MLflow filter string for the cells")
    args = parser.parse_args()
    records = [
        r for loc in args.locations for r in records_from_store(loc, filter_string=args.filter, methods=list(METHODS))
    ]
    table, rho, n_shared = compare_with_paper(summarise(records))
    print(table)
    print(f"Spearman's rho of the two orderings over the {n_shared} methods both tables hold: {rho:+.2f}")


if __name__ == "__main__":
    main()
