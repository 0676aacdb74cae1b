"""APoT side by side with the authors' code (yhhhli/APoT_Quantization), one process, one CPU: the same
initial weights and batches through the original's own training loop and this project's, 20 iterations,
every loss and every parameter/buffer bitwise equal. Both generations: MNIST (the ImageNet generation's
quantizer on a small ResNet) and CIFAR-10 ResNet-20 (the old generation, its own autograd Functions).

Patches to the original (asserted string replacements, tests/originals/orig.py):
  harness     CIFAR10/main.py parses sys.argv when imported -> `parser.parse_args([])`; its loop reads the
              module's `args.print_freq`, left at the default.
  CPU         `target.cuda(args.gpu, non_blocking=True)` -> `target`; the original wraps the model in
              DataParallel(...).cuda() inside main_worker, which is not called here (the model is built
              directly, as main_worker does before wrapping).
  torch 1.x   `data.clamp(lo, hi)` on the autograd path -> `_old_clamp(data, lo, hi)` (gradient 1 at both ends,
              as on the torch the original ran on); `optimizer.zero_grad()` -> `zero_grad(set_to_none=False)`
              (torch < 2.0 zeroed gradients in place).
"""
import types

import pytest
import torch

from tests.originals import orig

STEPS = 20


RecordingLoss = orig.RecordingLoss


class NullLog:
    def info(self, *a, **k):
        pass

    def scalar(self, *a, **k):
        pass

    def add_scalar(self, *a, **k):
        pass


def mnist_batches(n, batch, seed=0):
    """Learnable MNIST-shaped batches normalised as the script does (mean 0.131, std 0.308)."""
    return orig.mnist_batches(n, batch, 0.131, 0.308, seed)


MNIST_QL = [("data = data.clamp(-1, 1)", "data = _old_clamp(data, -1, 1)", 2),
            ("data = data.clamp(0, 1)", "data = _old_clamp(data, 0, 1)", 2)]
MNIST_MAIN = [("target = target.cuda(args.gpu, non_blocking=True)", "target = target", 2),
              ("optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)", 1)]


def load_mnist_original(root):
    return orig.load(f"{root}/MNIST", "main",
                     patches={"models/quant_layer.py": MNIST_QL, "main.py": MNIST_MAIN},
                     inject={"models/quant_layer.py": {"_old_clamp": orig.old_clamp}})


def run_mnist_pair(bit, power, arch="resnet10", steps=STEPS, batch=64, mutate=None):
    """(original losses, project losses, original state, project state) after `steps` SGD iterations."""
    from apot.ImageNet import engine
    from apot.MNIST import models as pmodels
    root = orig.checkout("APoT_Quantization")
    om = load_mnist_original(root)
    torch.manual_seed(0)
    ref = om.models.__dict__[arch](bit=bit)
    if not power:                                     # what main_worker does for --power 0
        for m in ref.modules():
            if isinstance(m, om.models.QuantConv2d):
                m.power = False
    ours = pmodels.__dict__[arch](bit=bit, power=power)
    ours.load_state_dict(ref.state_dict(), strict=True)
    args = types.SimpleNamespace(lr=0.01, momentum=0.9, weight_decay=1e-4, print_freq=1000, gpu=None)
    batches = mnist_batches(steps, batch)
    # the original's optimizer line (main_worker), then its train loop for one "epoch" of `steps` batches
    opt_ref = torch.optim.SGD(ref.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    loss_ref = RecordingLoss()
    om.train(batches, ref, loss_ref, opt_ref, 0, args, NullLog())
    opt_ours, _ = engine.make_optimizer(ours, args)
    loss_ours = RecordingLoss()
    if mutate:
        mutate(ours, opt_ours)
    engine.train(batches, ours, loss_ours, opt_ours, 0, args, NullLog(), torch.device("cpu"), 0)
    return loss_ref.values, loss_ours.values, ref.state_dict(), ours.state_dict()


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if not torch.equal(x, y):
            return i
    return None


@pytest.mark.parametrize("bit,power", [(4, True), (2, True), (3, False), (5, True)])
def test_mnist_generation_twenty_steps_bitwise(bit, power):
    l_ref, l_ours, s_ref, s_ours = run_mnist_pair(bit, power)
    assert len(l_ref) == len(l_ours) == STEPS
    assert first_difference(l_ref, l_ours) is None, f"losses differ from step {first_difference(l_ref, l_ours)}"
    assert orig.params_equal(s_ref, s_ours) == []
    assert l_ref[-1] < l_ref[0]                     # the model moved: a frozen run would compare equal too


def test_mnist_trajectory_check_catches_a_one_ulp_change():
    """The comparison is sensitive: one weight moved by one ulp before training makes the runs differ."""
    def nudge(model, _opt):
        w = model.layer1[0].conv1.weight
        with torch.no_grad():
            w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    l_ref, l_ours, s_ref, s_ours = run_mnist_pair(4, True, mutate=nudge)
    assert orig.params_equal(s_ref, s_ours) != []


CIFAR_MAIN = [("args = parser.parse_args()", "args = parser.parse_args([])", 1),
              ("input, target = input.cuda(), target.cuda()", "input, target = input, target", 2),
              ("optimizer.zero_grad()", "optimizer.zero_grad(set_to_none=False)", 1)]


def run_cifar_pair(bit, steps=STEPS, batch=16, mutate=None):
    from apot.CIFAR10 import main as pmain
    root = orig.checkout("APoT_Quantization")
    om = orig.load(f"{root}/CIFAR10", "main", patches={"main.py": CIFAR_MAIN})
    torch.manual_seed(0)
    ref = om.resnet20_cifar(float=False)
    for m in ref.modules():                        # what the original main() does for --bit
        if isinstance(m, om.QuantConv2d):
            m.weight_quant = om.weight_quantize_fn(w_bit=bit)
            m.act_grid = om.build_power_value(bit)
            m.act_alq = om.act_quantization(bit, m.act_grid)
    ours = pmain.build_model(pmain.parser.parse_args(["--bit", str(bit)]))
    ours.load_state_dict(ref.state_dict(), strict=True)
    batches = orig.cifar_batches(steps, batch)
    lr, wd = 0.04, 1e-4                            # train_res20.sh's quantized stages
    groups = []
    for name, params in ref.named_parameters():    # the original main()'s groups, in its order
        if 'act_alpha' in name:
            groups += [{'params': [params], 'lr': 1e-1, 'weight_decay': 1e-4}]
        elif 'wgt_alpha' in name:
            groups += [{'params': [params], 'lr': 2e-2, 'weight_decay': 1e-4}]
        else:
            groups += [{'params': [params]}]
    opt_ref = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
    loss_ref = RecordingLoss()
    om.train(batches, ref, loss_ref, opt_ref, 0)
    opt_ours = torch.optim.SGD(pmain.param_groups(ours), lr=lr, momentum=0.9, weight_decay=wd)
    if mutate:
        mutate(ours, opt_ours)
    loss_ours = RecordingLoss()
    pmain.train(batches, ours, loss_ours, opt_ours, 0, torch.device("cpu"), print_freq=1000)
    return loss_ref.values, loss_ours.values, ref.state_dict(), ours.state_dict()


@pytest.mark.parametrize("bit", [4, 2])
def test_cifar_old_generation_twenty_steps_bitwise(bit):
    l_ref, l_ours, s_ref, s_ours = run_cifar_pair(bit)
    assert len(l_ref) == len(l_ours) == STEPS
    assert first_difference(l_ref, l_ours) is None, f"losses differ from step {first_difference(l_ref, l_ours)}"
    assert orig.params_equal(s_ref, s_ours) == []
    assert l_ref[-1] < l_ref[0]


def test_cifar_trajectory_check_catches_a_changed_alpha_weight_decay():
    """One optimizer detail is caught: the activation clipping parameters' weight decay 1e-4 -> 2e-5 (the
    2-bit stage's global value, a plausible mix-up)."""
    def bump(_model, opt):
        for g in opt.param_groups:
            if g["lr"] == 1e-1:
                g["weight_decay"] = 2e-5
    l_ref, l_ours, s_ref, s_ours = run_cifar_pair(4, mutate=bump)
    assert orig.params_equal(s_ref, s_ours) != []
