"""Each ALQ stage is seeded from (--seed, stage), so a stage gives the same result however the
pipeline was split into invocations; --resume never continues or skips a stage made under other flags.
Tiny generated MNIST, in-process. Outputs of two runs on the same machine in the same kind of process are compared
exactly: the same float operations run in the same order, so any difference is a different RNG stream."""
import os

import pytest
import torch

import alq_import
from common.errors import UserError
from test_runs_alq import env  # noqa: F401  (the fixture: tiny MNIST, isolated runs/, shortened recipe)

A = alq_import.load()


def files(d):
    return ["--model_ori", str(d / "ori.pth"), "--model", str(d / "q.pth"), "--log_dir", str(d / "log")]


def tensors(path):
    ck = torch.load(path, weights_only=True)
    out = {f"net.{k}": v for k, v in ck["net_state_dict"].items()}
    for name, layer in ck["parameters_w_bin"].items():
        out.update({f"{name}.{k}": v for k, v in layer.items() if torch.is_tensor(v)})
    return out


def test_stage_seed_depends_on_seed_and_stage_only():
    seeds = {(s, st): A.stages.stage_seed(s, st) for s in (1, 2) for st in A.stages.STAGES}
    assert len(set(seeds.values())) == 6 and all(0 <= v < 2 ** 31 for v in seeds.values())
    assert A.stages.stage_seed(1, "ALQ") == A.stages.stage_seed(1, "ALQ")


def test_a_stage_gives_the_same_result_however_the_pipeline_is_split(env, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    A.lenet5.main(["--PRETRAIN", "--ALQ", "--POSTTRAIN"] + files(one) + env)       # one invocation
    A.lenet5.main(["--PRETRAIN"] + files(two) + env)                                # three invocations
    A.lenet5.main(["--ALQ"] + files(two) + env)
    A.lenet5.main(["--POSTTRAIN"] + files(two) + env)
    for f in ("ori.pth", "q.pth", "q_post.pth"):
        a = torch.load(one / f, weights_only=True)["net_state_dict"] if f == "ori.pth" else tensors(one / f)
        b = torch.load(two / f, weights_only=True)["net_state_dict"] if f == "ori.pth" else tensors(two / f)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_resume_refuses_to_skip_a_stage_made_with_other_flags(env, tmp_path):
    # measured: rerunning with --fix_importance_index --pr 0.1 --seed 7 skipped every stage and recorded the old
    # model as seed 7
    d = files(tmp_path / "r")
    A.lenet5.main(["--PRETRAIN", "--ALQ"] + d + env)
    q = tmp_path / "r" / "q.pth"
    stamp = os.path.getmtime(q)
    A.lenet5.main(["--PRETRAIN", "--ALQ", "--resume"] + d + env)                   # same flags: both skipped
    assert os.path.getmtime(q) == stamp
    with pytest.raises(UserError, match=r"ori.pth \(PRETRAIN\) was made with --seed 1, but this command asks for "
                                        r"--seed 7; .*--overwrite"):
        A.lenet5.main(["--PRETRAIN", "--ALQ", "--resume", "--seed", "7"] + d + env)
    with pytest.raises(UserError, match=r"q.pth \(ALQ\) was made with --pr 0.8, --fix_importance_index False, but "
                                        r"this command asks for --pr 0.1, --fix_importance_index True"):
        A.lenet5.main(["--PRETRAIN", "--ALQ", "--resume", "--fix_importance_index", "--pr", "0.1"] + d + env)
    assert os.path.getmtime(q) == stamp


def test_resume_refuses_to_continue_a_stage_under_other_flags(env, tmp_path, monkeypatch):
    d = files(tmp_path / "k")
    A.lenet5.main(["--PRETRAIN"] + d + env)
    orig = A.stages.train_coordinate

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(A.stages, "train_coordinate", killed)
    with pytest.raises(KeyboardInterrupt):
        A.lenet5.main(["--ALQ"] + d + env)
    monkeypatch.setattr(A.stages, "train_coordinate", orig)
    rp = tmp_path / "k" / "q.resume.pth"
    assert rp.exists()
    with pytest.raises(UserError, match=r"q.resume.pth \(ALQ\) was made with --top_k 0.05, but this command asks "
                                        r"for --top_k 0.1"):
        A.lenet5.main(["--ALQ", "--resume"] + d + env + ["--top_k", "0.1"])
    A.lenet5.main(["--ALQ", "--resume"] + d + env)                                  # same flags: continues
    assert not rp.exists() and A.checkpoints.is_finished(tmp_path / "k" / "q.pth")
