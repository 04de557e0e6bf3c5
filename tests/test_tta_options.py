"""Every option of every registered adapter (:func:`~monai_grata.tta.adapter_defaults`) is documented in its class's
``Args:`` and changes what the adapter does: a non-default value changes the returned logits or the adapted state
within a few batches of a toy network, against the defaults on the same seed and inputs.

A new option needs an entry in ``CASES``; an option that has no effect is marked there (``xfail``) with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from monai_grata.networks import build_denoiser
from monai_grata.tta import adapter_class, adapter_defaults, adapter_names, build_adapter
from monai_grata.tta.dltta import train_autoencoders

from .test_tta_baselines import images, sharp_net

#: the batches each adapter sees: enough for a memory bank, a momentum schedule or a reset to show
N_BATCHES = 5
#: the flat options of a BatchNorm policy, documented through the constructor's ``normalization`` argument
POLICY_OPTIONS = {
    name: "normalization"
    for name in (
        "bn_prior",
        "bn_momentum",
        "bn_first_layers",
        "bn_first_prior",
        "bn_min_shift",
        "bn_first_min_shift",
        "bn_site_min_shift",
        "bn_first_site_min_shift",
        "bn_site_min_batches",
    )
}


@dataclasses.dataclass(frozen=True)
class Built:
    """An option value built for the toy network (a module the option takes; built fresh for each adapter)."""

    make: Callable[[nn.Module], object]


@dataclasses.dataclass(frozen=True)
class Case:
    """One option's check.

    Args:
        value: a non-default value.
        base: options set in both runs, where the option acts only with them (e.g. a momentum needs a prior).
        expect: ``"changes"`` (logits or state differ from the run without the option) or ``"same"`` (a speed
            switch: the same results up to float rounding).
        why: for anything but a plain ``"changes"``, why this value and this check.
        no_effect: why the option has no effect at all (the case is then expected to fail).
    """

    value: object
    base: dict = dataclasses.field(default_factory=dict)
    expect: str = "changes"
    why: str = ""
    no_effect: str = ""


_PRIOR = {"bn_prior": 4.0}
_SETTLE = {"bn_prior": 4.0, "settle": 1}
_RETRIEVAL = {"k": 2}  # retrieval from the fourth batch on


def _policy_cases(prior_value: float = 4.0) -> dict[str, Case]:
    return {
        "bn_prior": Case(prior_value),
        "bn_momentum": Case(0.5, base={"bn_prior": 4.0}, why="a momentum moves a source prior: needs bn_prior > 0"),
        "bn_first_layers": Case(1, base={"bn_prior": 4.0}, why="the first layer on the batch alone: needs a prior"),
        "bn_first_prior": Case(
            2.0, base={"bn_prior": 4.0, "bn_first_layers": 1}, why="the first layers' prior: needs first layers"
        ),
        "bn_min_shift": Case(1e3, why="a gate above every batch's divergence: the source statistics throughout"),
        "bn_first_min_shift": Case(
            1e3, base={"bn_prior": 4.0, "bn_first_layers": 1}, why="the first layers' gate: needs first layers"
        ),
        "bn_site_min_shift": Case(
            1e-9,
            base={"bn_prior": 4.0, "bn_min_shift": 1e3},
            why="a shut per-batch gate that the site gate opens from the fifth batch on",
        ),
        "bn_first_site_min_shift": Case(
            1e-9,
            base={"bn_prior": 4.0, "bn_first_layers": 1, "bn_first_min_shift": 1e3},
            why="the first layers' shut gate, opened from the fifth batch on",
        ),
        "bn_site_min_batches": Case(
            1,
            base={"bn_prior": 4.0, "bn_min_shift": 1e3, "bn_site_min_shift": 1e-9},
            why="the site gate opens from the first batch instead of the fifth",
        ),
    }


CASES: dict[str, dict[str, Case]] = {
    "detta": {
        "denoiser": Case(
            Built(lambda net: build_denoiser(net, seed=1)),
            why="a trained decoder needs source training: an untrained one of another seed stands in",
        ),
        "lr": Case(1e-2),
        "window": Case(3),
        "episodic": Case(True),
        "seed": Case(1),
        "plane": Case(
            (-1, -2), expect="same", why="an image has one plane (the same two axes either way); a volume needs it"
        ),
        **_policy_cases(),
    },
    "diga": {
        "confidence": Case(0.6),
        "tau": Case(5.0),
        "feature_layer": Case("3"),  # the input of the second convolution instead of the head's
        "episodic": Case(True),
        "multilabel": Case(False),
        **_policy_cases(prior_value=0.0),
    },
    "dltta": {
        "autoencoders": Case(
            Built(lambda net: train_autoencoders(net, torch.rand(2, 3, 16, 16), epochs=1)),
            why="autoencoders fitted for one epoch on random images stand in for ones fitted to source images",
        ),
        "lr": Case(1e-2),
        "k": Case(1, why="retrieval (lr from the discrepancy) starts at the third batch instead of the warm-up"),
        "ensemble": Case("weighted_sum", base=_RETRIEVAL, why="combines k >= 2 retrieved neighbours"),
        "image_adaptor": Case(True),
        "adaptor_layers": Case(["2"]),
        "key_layer": Case("2", base=_RETRIEVAL, why="the key only ranks the bank's entries once retrieval runs"),
        "multilabel": Case(False, base=_RETRIEVAL, why="the updates take no output; the discrepancy does"),
        "episodic": Case(True),
        "seed": Case(1),
    },
    "domainadaptor": {
        "lr": Case(1e-2),
        "momentum": Case(0.9, base={"episodic": False}, why="episodic (the default) clears the momentum each batch"),
        "episodic": Case(False),
        "multilabel": Case(False),
    },
    "dua": {
        "n_augmentations": Case(4),
        "momentum": Case(0.5),
        "decay": Case(0.5),
        "plane": Case((-1, -2)),
        "max_updates": Case(1),
        "episodic": Case(True),
        "seed": Case(1),
    },
    "grata": {
        "beta": Case(1e-2),
        "aux": Case("consistency"),
        "pseudo": Case("entropy"),
        "activation": Case("linear"),
        "align": Case(False),
        "dynamic_lr": Case(False),
        "strong_transform": Case(Built(lambda net: nn.Identity())),
        "episodic": Case(True),
        "multilabel": Case(False),
        "views": Case([((), 0), ((-1,), 0)]),
        "seed": Case(1),
        "batch_views": Case(False, expect="same", why="a speed switch: one forward per view gives the same result"),
        "radius": Case(0.01),
        "min_cos": Case(0.99),
        "steps": Case(2),
        "min_shift": Case(100.0, base=_PRIOR, why="the shift is read against the source statistics: bn_prior > 0"),
        "reuse_teacher": Case(
            True, base={"steps": 2, "beta": 0.1}, why="a teacher is reused only by a batch's later updates"
        ),
        "settle": Case(1, base=_PRIOR, why="the shift is read against the source statistics: bn_prior > 0"),
        "settle_every": Case(2, base=_SETTLE, why="acts once settled"),
        "settle_tolerance": Case(1e-6, base=_SETTLE, why="acts once settled: so tight that every batch restarts"),
        "no_grad_dtype": Case(
            "bfloat16", base={"beta": 1e-2}, why="the teacher's rounding shows in a large enough step"
        ),
        "teacher_channels_last": Case(
            True, expect="same", why="a speed switch: NHWC convolutions give the same result up to float rounding"
        ),
        **_policy_cases(),
    },
    "medbn": {
        "lr": Case(1e-2),
        "episodic": Case(True),
        "multilabel": Case(False),
        "predict": Case("after"),
        **_policy_cases(),
    },
    "norm": {
        "episodic": Case(
            True,
            base={"bn_prior": 4.0, "bn_momentum": 0.5},
            why="the only state is a prior that follows the stream (bn_momentum): episodic puts the source back",
        ),
        **_policy_cases(),
    },
    "norm_select": {
        "priors": Case((0.0,)),
        "criterion": Case(
            "consistency", base={"priors": (1.0, 0.0)}, why="on the toy, entropy picks 0 and consistency 1"
        ),
        "views": Case(
            (((), 0, (-2, -1)),),
            base={"criterion": "consistency", "priors": (0.0, 1.0)},
            why="the identity view alone has no disagreement to score: the priors tie and the first (0) wins, where "
            "the six views pick 1",
        ),
        "multilabel": Case(False),
    },
    "sar": {
        "lr": Case(1e-2),
        "momentum": Case(0.0),
        "rho": Case(0.5),
        "margin": Case(0.1),
        "episodic": Case(True),
        "multilabel": Case(False),
        "predict": Case("after"),
        **_policy_cases(),
    },
    "tent": {
        "lr": Case(1e-2),
        "episodic": Case(True),
        "multilabel": Case(False),
        "predict": Case("after"),
        **_policy_cases(),
    },
}

#: options not named in their class's ``Args:``
UNDOCUMENTED = {}


def _case_params() -> list:
    return [
        pytest.param(
            name,
            option,
            case,
            marks=[pytest.mark.xfail(raises=AssertionError, strict=True, reason=case.no_effect)]
            if case.no_effect
            else [],
            id=f"{name}-{option}",
        )
        for name, options in CASES.items()
        for option, case in options.items()
    ]


def _option_params() -> list:
    params = []
    for name in adapter_names():
        for option in adapter_defaults(name):
            reason = UNDOCUMENTED.get((name, option))
            marks = [pytest.mark.xfail(raises=AssertionError, strict=True, reason=reason)] if reason else []
            params.append(pytest.param(name, option, marks=marks, id=f"{name}-{option}"))
    return params


def documented_arguments(cls: type) -> set[str]:
    """The argument names of the ``Args:`` section of ``cls``'s docstring."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Args:\n(.*?)(?=^\S|\Z)", doc, flags=re.MULTILINE | re.DOTALL)
    return set(re.findall(r"^    (\w+)(?: \(.*?\))?:", section.group(1), flags=re.MULTILINE)) if section else set()


@functools.cache
def run_defaults(name: str, base: tuple) -> list[torch.Tensor]:
    """:func:`run` with only the options ``base`` (sorted items), which many cases share."""
    return run(name, dict(base))


def run(name: str, options: dict) -> list[torch.Tensor]:
    """The logits of each of ``N_BATCHES`` batches, then every tensor of the adapter's state (network, adaptors,
    decoders, their buffers), from a fresh toy network and the same seed."""
    torch.manual_seed(0)
    net = sharp_net()
    options = {k: v.make(net) if isinstance(v, Built) else v for k, v in options.items()}
    if "multilabel" in inspect.signature(adapter_class(name)).parameters:
        options = {"multilabel": True, **options}
    adapter = build_adapter(name, net, **options)
    torch.manual_seed(0)
    logits = [adapter(x).detach().clone() for x in images(N_BATCHES)]
    return logits + [t.detach().clone() for t in adapter.state_dict().values()]


def differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether some logits or state of ``a`` and ``b`` differ by more than float rounding."""
    if len(a) != len(b):  # the state gained or lost tensors (e.g. an adaptor's)
        return True
    return any(x.shape != y.shape or not torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b, strict=True))


def test_every_option_has_a_case():
    """A new option, or a renamed one, must get an entry in ``CASES`` (and one that is gone, lose it)."""
    wanted = {(name, option) for name in adapter_names() for option in adapter_defaults(name)}
    taken = {(name, option) for name in adapter_names() for option in inspect.signature(adapter_class(name)).parameters}
    have = {(name, option) for name, options in CASES.items() for option in options}
    missing, stale = sorted(wanted - have), sorted(have - wanted - taken)
    assert not missing, (
        f"no entry in CASES of tests/test_tta_options.py for {missing}: add a non-default value that changes the "
        f"logits or adapted state within {N_BATCHES} batches (or mark why it has no effect)"
    )
    assert not stale, f"CASES of tests/test_tta_options.py lists options the adapters no longer take: {stale}"


@pytest.mark.parametrize("name, option", _option_params())
def test_every_option_is_documented(name, option):
    cls = adapter_class(name)
    documented = documented_arguments(cls)
    if option in POLICY_OPTIONS:
        assert POLICY_OPTIONS[option] in inspect.signature(cls).parameters
        option = POLICY_OPTIONS[option]
    assert option in documented, f"{cls.__name__}'s Args do not document {option!r}"


@pytest.mark.parametrize("name, option, case", _case_params())
def test_every_option_has_an_effect(name, option, case):
    assert case.value != adapter_defaults(name).get(option), "the case's value is the default"
    default = run_defaults(name, tuple(sorted(case.base.items())))
    changed = run(name, {**case.base, option: case.value})
    setting = f"{name}: {option}={case.value!r}" + (f" with {case.base}" if case.base else "")
    if case.expect == "same":
        assert not differs(default, changed), f"{setting} changed the results of a speed switch"
    else:
        assert differs(default, changed), f"{setting} changed neither logits nor state"
