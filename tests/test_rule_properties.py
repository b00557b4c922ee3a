"""Every registered rule against its realised float64 Lipschitz ratios.

For each key of :func:`lipbound.rules.registered_keys` (collected when this file is
imported, so a newly registered rule gets its own test), hypothesis draws one of the key's
program generators and a seed; the generated one-op program (:func:`lipbound.testing.generate`
with ``minimal=True``: the op alone, with random parameters) is bounded by AutoLip in every
norm the rule claims, and that certified constant must be at least the largest ratio an
adversarial float64 search realises (Jacobian norms at random and large points, Jacobian
ascent, pair-ratio ascent). A key without a generator fails
:func:`test_every_registered_rule_has_a_generator`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import lipbound
from lipbound.errors import LipboundError
from lipbound.rules import get_rule, registered_keys
from lipbound.testing import (
    ATOL,
    RTOL,
    RTOL_LOSSY,
    GenerationError,
    generate,
    generators_for,
    key_name,
    realised_lipschitz,
    uncovered_keys,
)

KEYS = registered_keys()


def test_every_registered_rule_has_a_generator() -> None:
    missing = [key_name(k) for k in uncovered_keys()]
    assert missing == [], (
        "registered rule keys without a program generator (add one with "
        f"lipbound.testing.register_generator): {missing}"
    )


@pytest.mark.parametrize("key", KEYS, ids=[key_name(k) for k in KEYS])
@settings(max_examples=2, phases=(Phase.explicit, Phase.generate))
@given(data=st.data())
def test_declared_constant_bounds_realised_ratios(key: object, data: st.DataObject) -> None:
    gens = generators_for(key)
    assert gens, f"no generator for {key_name(key)}"
    gen = data.draw(st.sampled_from(gens), label="generator")
    seed = data.draw(st.integers(0, 10**6), label="seed")
    try:
        prog = generate(seed, focus=gen, minimal=True)
    except GenerationError:
        prog = generate(0, focus=gen, minimal=True)
    rule = get_rule(key)  # type: ignore[arg-type]
    norms = rule.norms if rule is not None else ("1", "2", "inf")
    model = prog.build()
    truth = realised_lipschitz(model, prog.input_shape, norms=norms, seed=seed, points=16,
                               ascent_steps=4, pair_chains=8, pair_steps=10,
                               bisect_steps=0 if prog.lossy else 14)  # x.float(): a staircase
    rtol = RTOL_LOSSY if prog.lossy else RTOL
    for norm in norms:
        try:
            res = lipbound.autolip(model, prog.input_shape, norm=norm)
        except LipboundError:
            continue  # the rule's check refuses these parameters: no constant is declared
        if not res.certified or res.upper is None:
            continue
        t = truth[norm]
        assert t.value <= res.upper * (1 + rtol) + ATOL, (
            f"{key_name(key)} l{norm}: declared {res.upper!r} < realised {t.value!r} "
            f"({t.how}, x={t.x}, y={t.y})\n{prog.source()}"
        )
    torch.manual_seed(0)
