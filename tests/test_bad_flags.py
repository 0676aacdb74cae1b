"""Contradictory or impossible flags of DAMBQ and FDDA: one line, exit 2, before any work."""
import pytest

from common.errors import UserError


@pytest.mark.parametrize("argv,needle", [
    (["--wgt-target", "4.0"], "--wgt-target set the quantized bit targets, but without --quantize"),
    (["--act-target=3.0", "--wgt-target", "3.0"], "--wgt-target and --act-target"),
    (["--quantize", "--continue", "runs/a/latest.pth.tar", "--resume", "b.pth"],
     "--continue runs/a/latest.pth.tar continues that run .* --resume b.pth starts a new run: pass only one"),
])
def test_dambq_contradictory_flags(argv, needle):
    from dambq import main_cifar10 as m
    with pytest.raises(UserError, match=needle):
        m.parse_args(["-a", "resnet20"] + argv)
    m.parse_args(["-a", "resnet20", "--quantize", "--pretrained", "f.pth", "--wgt-target", "4.0"])   # accepted


@pytest.mark.parametrize("key", ["lr_S", "lr_G", "alpha", "weightDecay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_fdda_non_finite_or_negative_rates_are_refused(key, value):
    import os
    from fdda.options import Option
    conf = os.path.join(os.path.dirname(__file__), "..", "fdda", "imagenet_config.hocon")
    with pytest.raises(UserError, match=f"{key} ="):
        Option.from_args(conf, {key: value}, env={}).validate()
