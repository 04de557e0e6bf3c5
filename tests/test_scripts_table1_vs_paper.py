"""``scripts/table1_vs_paper.py``: ranks, pairs above No Adapt and Spearman's rho against the paper's Table 1."""

import pytest

from monai_grata.benchmark import summarise

from .conftest import load_script

PAIRS = (("a", "b"), ("b", "a"))


@pytest.fixture(scope="module")
def script():
    return load_script("table1_vs_paper")


def records(dice: dict[str, tuple[float, float]]) -> list[dict]:
    """One seed-0 cell per method and pair: ``dice[method]`` holds the mean Dice on the two pairs."""
    return [
        {"method": m, "source": s, "target": t, "seed": 0, "dice_mean": d, "images_per_s": 1.0}
        for m, values in dice.items()
        for (s, t), d in zip(PAIRS, values, strict=True)
    ]


def test_same_ordering_as_the_paper_gives_rho_one(script):
    paper = script.PAPER_AVERAGE
    dice = {m: (paper[m] / 100, paper[m] / 100) for m in ("none", "tent", "grata", "sar")}
    dice["norm"] = (0.9, 0.1)  # not in the paper: in the table, without a paper rank, outside rho
    table, rho, n_shared = script.compare_with_paper(summarise(records(dice)))
    assert n_shared == 4 and rho == pytest.approx(1.0)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert rows["grata"] == "| grata | 0.7434 | +0.0587 | 2 of 2 | 1 | 74.34 | +5.87 | 1 |"
    assert rows["none"] == "| none | 0.6847 | +0.0000 | 0 of 2 | 4 | 68.47 | +0.00 | 4 |"
    assert rows["norm"] == "| norm | 0.5000 | -0.1847 | 1 of 2 | – | – | – | – |"


def test_reversed_ordering_gives_rho_minus_one(script):
    dice = {"none": (0.9, 0.9), "tent": (0.8, 0.8), "grata": (0.6, 0.6)}
    table, rho, n_shared = script.compare_with_paper(summarise(records(dice)))
    assert n_shared == 3 and rho == pytest.approx(-1.0)
    assert "| grata | 0.6000 | -0.3000 | 0 of 2 | 3 |" in table


def test_a_store_without_no_adapt_is_an_error(script):
    with pytest.raises(ValueError, match="no complete 'none' row"):
        script.compare_with_paper(summarise(records({"tent": (0.8, 0.8), "grata": (0.6, 0.6)})))
