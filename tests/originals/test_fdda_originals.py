"""FDDA against the authors' trainer_DBNS_CBNS.py / main_DBNS_CBNS.py, bitwise, both sides in one process.

resnet18 (pytorchcv, random init with randomised BN running statistics, its 7x7 final pool replaced by a 1x1
pool on both sides so that 32x32 images fit), W4A4, 1000 classes, batch 4. Epoch 0 trains the generator only
(warm-up, activation ranges calibrating), epoch 1 also trains the student by KD on real + generated images at
lr_S = 0.001 (the student moves visibly); ITERS iterations per epoch. After every generator step and every
student step the generator's and student's weights, the activation ranges (x_min / x_max) and the KD loss must
be bitwise equal.

Patches to the original (asserted string replacements): `.cuda()` removed (CPU); `utils.data_parallel`'s GPU
assert and `.cuda()` removed (CPU); `iters = 200` -> ITERS (test length); `zero_grad()` ->
`zero_grad(set_to_none=False)` (torch < 2.0 zeroed gradients in place); the HEAD commit's 'add data
augmentation' block removed: it is the only difference between the pinned commit's trainer and the seed-era
trainer 2240fc8 this project implements, and it crashes (`transforms` is not imported, `torch.from_numpy` of a
tensor). `termcolor` (imported by the original's utils, not installed) is a stub; the tensorboard import of
main_DBNS_CBNS.py (unused here) is removed.
"""
import copy
import os
import pickle
import random
import sys
import types

import pytest
import torch
import torch.nn as nn

from tests.originals import orig

ITERS, B, IMG, LATENT, QW, QA = 10, 4, 32, 16, 4, 4
N_CLASSES, L = 1000, 20

AUGMENT = """				## add data data augmentation
				train_transform = transforms.Compose([
					transforms.RandomResizedCrop(size=224, scale=(0.5, 1.0)),
					transforms.RandomHorizontalFlip(),
				])
				G_images = train_transform(torch.from_numpy(G_images))
				G_output_teacher_batch = self.model_teacher(G_images)
"""


def _load(root, monkeypatch):
    tc = types.ModuleType("termcolor")
    tc.colored = lambda s, *a, **k: s
    monkeypatch.setitem(sys.modules, "termcolor", tc)
    with open(os.path.join(root, "trainer_DBNS_CBNS.py")) as f:
        n_cuda = f.read().count(".cuda()")
    utils_patch = [("    assert torch.cuda.device_count() >= gpu0 + ngpus, \"Invalid Number of GPUs\"\n", "", 1),
                   ("            model = model.cuda()\n", "            pass\n", 1)]
    patches = {"trainer_DBNS_CBNS.py": [(".cuda()", "", n_cuda), (AUGMENT, "", 1), ("iters = 200", "iters = ITERS", 1),
                                        ("self.optimizer_G.zero_grad()", "self.optimizer_G.zero_grad(set_to_none=False)", 2),
                                        ("self.optimizer_S.zero_grad()", "self.optimizer_S.zero_grad(set_to_none=False)", 2)],
               "utils/model_transform.py": utils_patch,
               "main_DBNS_CBNS.py": [("from torch.utils.tensorboard import SummaryWriter\n", "", 1)]}
    # quantization_utils has no __init__.py (a namespace package), which orig.load does not import: sys.path
    monkeypatch.syspath_prepend(root)
    main = orig.load(root, "main_DBNS_CBNS", patches=patches)
    trainer = orig.load(root, "trainer_DBNS_CBNS", patches=patches, inject={"trainer_DBNS_CBNS.py": {"ITERS": ITERS}})
    return main, trainer


def _settings(**kw):
    s = dict(nGPU=1, GPU=0, nClasses=N_CLASSES, lr_S=0.001, momentum=0.9, weightDecay=1e-4, lr_G=1e-3, b1=0.5,
             b2=0.999, batchSize=B, latent_dim=LATENT, warmup_epochs=1, alpha=1.0, temperature=4.0,
             dataset="imagenet", nEpochs=4, img_size=IMG, channels=3, qw=QW, qa=QA, step_G=[100, 200, 300],
             decayRate_G=0.1, lrPolicy_G="multi_step")
    s.update(kw)
    return types.SimpleNamespace(**s)


def _fixture():
    from fdda import models
    torch.manual_seed(0)
    teacher = models.build("resnet18", N_CLASSES).eval()
    teacher.features.final_pool = nn.AvgPool2d(kernel_size=1, stride=1)      # 32x32 input: 1x1 before the pool
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    chans = [m.num_features for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(chans) == L
    tm = {c: [torch.randn(n) * 0.1 for n in chans] for c in range(N_CLASSES)}
    tv = {c: [torch.rand(n) + 0.5 for n in chans] for c in range(N_CLASSES)}
    tout = torch.zeros(N_CLASSES, N_CLASSES)
    for c in range(0, N_CLASSES, 2):          # every even class is in the correct set (odd: argmax 0, wrong)
        tout[c, c] = 5.0
    real = [(torch.randn(3, IMG, IMG), ("p%d" % i,), i % N_CLASSES) for i in range(10)]
    return teacher, tm, tv, tout, real


def _loader(real):
    return torch.utils.data.DataLoader(real, batch_size=B, shuffle=True, drop_last=True)


def _snap(model, params=True):
    sd = model.state_dict()
    keys = [k for k in sd if (params and k in dict(model.named_parameters())) or k.endswith(("x_min", "x_max"))]
    # cur_x_min/max (the last batch's min/max): 0-d in the original, (1,) here (DEVIATIONS.md): compared flat
    return {k: sd[k].detach().clone().reshape(-1) if "cur_x_" in k else sd[k].detach().clone() for k in keys}


class Recorder:
    """Per-step records: ('G', generator params) after each generator step, ('S', kd loss, student params +
    ranges) after each student step, ('R', ranges) after each iteration's student forward in the warm-up."""

    def __init__(self):
        self.steps = []


def _wrap_step(opt, fn):
    inner = opt.step

    def step(*a, **k):
        out = inner(*a, **k)
        fn()
        return out
    opt.step = step


def run_original(main, tr_mod, fix, tmp_path, monkeypatch):
    teacher, tm, tv, tout, real = fix
    s = _settings()
    head = tmp_path / "save_ImageNet"
    head.mkdir(exist_ok=True)
    for name, obj in (("mean_Categorical_bs_1", {c: {c: tm[c]} for c in tm}),
                      ("var_Categorical_bs_1", {c: {c: tv[c]} for c in tv}),
                      ("teacher_output_Categorical_1", {c: tout[c:c + 1] for c in range(N_CLASSES)})):
        with open(head / f"resnet18_{name}.pickle", "wb") as f:
            pickle.dump(obj, f)
    monkeypatch.chdir(tmp_path)
    fake = types.SimpleNamespace(settings=s)
    fake.quantize_model = lambda mod: main.ExperimentDesign.quantize_model(fake, mod)
    student = fake.quantize_model(copy.deepcopy(teacher))
    torch.manual_seed(1)
    gen = main.Generator_imagenet(s)
    gen_state = copy.deepcopy(gen.state_dict())
    lr_G = tr_mod.utils.LRPolicy(s.lr_G, s.nEpochs, s.lrPolicy_G)
    lr_G.set_params(params_dict={"step": s.step_G, "decay_rate": s.decayRate_G})
    log = types.SimpleNamespace(info=lambda *a: None)
    t = tr_mod.Trainer(model=student, model_teacher=copy.deepcopy(teacher), generator=gen, lr_master_S=None,
                       lr_master_G=lr_G, train_loader=None, test_loader=None, settings=s, logger=log,
                       use_FDDA=True, batch_index=0, model_name="resnet18", D_BNSLoss_weight=0.1,
                       C_BNSLoss_weight=0.02, FDDA_iter=1, BNLoss_weight=0.1)
    rec = []
    _wrap_step(t.optimizer_G, lambda: rec.append(("G", _snap(gen))))
    kd = []
    inner_bs = t.backward_S
    t.backward_S = lambda loss: (kd.append(loss.detach().clone()), inner_bs(loss))[1]
    _wrap_step(t.optimizer_S, lambda: rec.append(("S", kd[-1], _snap(student))))
    QA_cls = type(next(m for m in student.modules() if type(m).__name__ == "QuantAct"))
    random.seed(5)
    torch.manual_seed(5)
    loader = _loader(real)
    for epoch in range(2):
        for m in student.modules():
            if isinstance(m, QA_cls):
                m.fix()
                if epoch < 4:
                    m.unfix()
        t.train(epoch=epoch, true_data_loader=loader)
        rec.append(("E", _snap(student)))
    return rec, student, gen_state


def run_project(fix, gen_state, student_like, mutate=None):
    from fdda import models
    from fdda import trainer_DBNS_CBNS as T
    from fdda.conditional_batchnorm import Generator_imagenet
    from fdda.distributed import Dist
    from fdda.options import Option
    from fdda.quantization_utils import freeze_model, unfreeze_model
    teacher, tm, tv, tout, real = fix
    s = _settings()
    opt = Option.from_args(None, dict(batchSize=B, latent_dim=LATENT, img_size=IMG, iters_per_epoch=ITERS,
                                      warmup_epochs=1, nEpochs=s.nEpochs, lr_S=s.lr_S, lr_G=s.lr_G,
                                      momentum=s.momentum, weightDecay=s.weightDecay, alpha=s.alpha,
                                      temperature=s.temperature, C_BNSLoss_weight=0.02, D_BNSLoss_weight=0.1,
                                      BNLoss_weight=0.1, b1=s.b1, b2=s.b2, step_G=s.step_G, decayRate_G=s.decayRate_G,
                                      cosine_epochs=20000 // ITERS, qw=QW, qa=QA), env={})  # T_max = 100 x 200
    student = models.build_student(teacher, "resnet18", QW, QA)
    gen = Generator_imagenet(N_CLASSES, LATENT, IMG, 3, 0.8)
    gen.load_state_dict(gen_state)
    from fdda.bns import correct_set
    t = T.Trainer(student, copy.deepcopy(teacher), gen, opt, tm, tv, correct_set(tout), N_CLASSES, L,
                  models.dbns_start_layer(L), torch.device("cpu"), Dist(), _loader(real))
    rec, kd = [], []
    _wrap_step(t.optimizer_G, lambda: rec.append(("G", _snap(gen))))
    kd_inner = T.kd_loss

    def kd_loss(*a):
        v = kd_inner(*a)
        if mutate == "kd_sign":
            v = -v
        kd.append(v.detach().clone())
        return v
    saved = T.kd_loss, T.BNStats._hook
    T.kd_loss = kd_loss
    if mutate == "var_mean":
        def hook(self, module, inputs, output):
            var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
            self.mean.append(mean), self.var.append(var), self.modules.append(module)
        T.BNStats._hook = hook
    if mutate == "no_student_step":
        t.optimizer_S.step = lambda *a, **k: None
        t.scheduler_S.step = lambda *a, **k: None
        t.optimizer_S.zero_grad = lambda *a, **k: rec.append(("S", kd[-1], _snap(student)))
    else:
        _wrap_step(t.optimizer_S, lambda: rec.append(("S", kd[-1], _snap(student))))
    try:
        random.seed(5)
        torch.manual_seed(5)
        for epoch in range(2):
            freeze_model(student)
            if epoch < opt.unfreeze_epochs:
                unfreeze_model(student)
            t.train(epoch)
            rec.append(("E", _snap(student)))
    finally:
        T.kd_loss, T.BNStats._hook = saved
    return rec


def _bits(x):
    return x.reshape(-1).view(torch.uint8) if x.is_floating_point() else x


def _same(a, b):
    """Position of the first differing record (None: all equal); records carry tensors or dicts of them."""
    def eq(x, y):
        if isinstance(x, dict):
            return list(x) == list(y) and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, torch.Tensor):
            return x.shape == y.shape and torch.equal(_bits(x), _bits(y))
        return x == y
    for i, (x, y) in enumerate(zip(a, b)):
        if not (len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _iteration(rec, pos):
    """Training iteration (1-based, over both epochs) of record `pos`: each iteration ends with a 'G' record
    (and an 'S' one in the student phase)."""
    return sum(1 for r in rec[:pos + 1] if r[0] == "G")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = orig.checkout("FDDA")
    mp = pytest.MonkeyPatch()
    try:
        torch.set_num_threads(1)
        main, tr_mod = _load(root, mp)
        fix = _fixture()
        rec_o, student_o, gen_state = run_original(main, tr_mod, fix, tmp_path_factory.mktemp("fdda"), mp)
    finally:
        mp.undo()
    return fix, rec_o, gen_state, student_o


def test_trajectory_bitwise(both):
    fix, rec_o, gen_state, student_o = both
    rec_p = run_project(fix, gen_state, student_o)
    kinds = [r[0] for r in rec_o]
    assert kinds.count("G") == 2 * ITERS and kinds.count("S") == ITERS       # 20 iterations, 10 student steps
    first_s = next(r for r in rec_o if r[0] == "S")
    start = _snap(student_o)                                                # the student moved visibly
    moved = max(float((first_s[2][k] - rec_o[-1][1][k]).abs().max()) for k in first_s[2] if "weight" in k)
    assert moved > 1e-4
    assert _same(rec_o, rec_p) is None
    assert start.keys() == rec_p[-1][1].keys()


@pytest.mark.parametrize("mutation", ["no_student_step", "kd_sign", "var_mean"])
def test_mutations_detected(both, mutation, capsys):
    fix, rec_o, gen_state, student_o = both
    rec_p = run_project(fix, gen_state, student_o, mutate=mutation)
    pos = _same(rec_o, rec_p)
    if mutation == "var_mean" and pos is None:
        # the two round differently in general (shown here on a random input), but alike for every BN input
        # of this short trajectory on the machine it was written on: the mutation is real, not observable here
        x = torch.randn(8, 64, 9, 9) * 3 + 1
        v, m = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        assert not (torch.equal(m, x.mean([0, 2, 3])) and torch.equal(v, x.var([0, 2, 3], unbiased=False)))
        pytest.skip("var_mean differs from mean/var in the last bit in general but not on this trajectory's inputs")
    assert pos is not None, f"{mutation} was not detected"
    with capsys.disabled():
        print(f"\n{mutation}: first difference at iteration {_iteration(rec_o, pos)} ({rec_o[pos][0]} record)")


