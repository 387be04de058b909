"""setup.cfg's GPU extras pin fla-core releases that the delta rule's dispatch knows how to call:
`gpu` the release whose internals model/ops/gated_delta_rule.py reads (q/k repeated inside its
functions), `hopper` one that takes grouped value heads as they are, with flash-qla's TileLang
kernels beside it."""

import configparser
from pathlib import Path

from model.ops.gated_delta_rule import FLA_INTERNALS_CHECKED_ON, fla_takes_grouped_value_heads

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def extra(name: str) -> dict[str, str]:
    """The extra's requirements as {package: version pin or ''}."""
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    lines = [line.strip() for line in parser["options.extras_require"][name].splitlines() if line.strip()]
    return {package: version for package, _, version in (line.partition("==") for line in lines)}


def test_the_gpu_extra_pins_the_fla_release_whose_internals_are_read():
    version = extra("gpu")["fla-core"]
    assert version in FLA_INTERNALS_CHECKED_ON
    assert not fla_takes_grouped_value_heads(version)


def test_the_hopper_extra_pins_an_fla_release_that_takes_grouped_heads_with_its_tilelang_kernels():
    requirements = extra("hopper")
    assert fla_takes_grouped_value_heads(requirements["fla-core"])
    assert requirements["fla-core"] not in FLA_INTERNALS_CHECKED_ON
    # without tilelang, fla-core 0.6 refuses the gated backward on Hopper with Triton < 3.7.1
    assert {"flash-qla", "tilelang"} <= requirements.keys()
    assert all(requirements.values()), "every hopper requirement is pinned to the release measured"


def test_the_release_check_reads_major_and_minor():
    assert fla_takes_grouped_value_heads("0.6.0")
    assert fla_takes_grouped_value_heads("1.0.0")
    assert not fla_takes_grouped_value_heads("0.5.9")
    assert not fla_takes_grouped_value_heads("0.4.2")
