"""No host synchronisation where it costs a GPU step (the host would wait for the device every batch), for
DAMBQ, AlignQ, FDDA and ALQ (APoT: tests/test_speed_apot.py): a lint over every quantizer's forward/backward,
and over the per-batch body of each training and evaluation pass, where the running loss/accuracy stay on the
device (read at print lines and at the end). Plus: the device-side ALQ epoch statistics give exactly the
figures of the host-side sums they replaced."""
import pytest
import torch

import alq_import
from alignq import baselines as alignq_baselines, engine as alignq_engine, quant as alignq_quant
from dambq import main_cifar10 as dambq_main
from dambq.model import quant_layers as dambq_quant
from fdda import trainer_DBNS_CBNS as fdda_trainer
from fdda.quantization_utils import quant_modules as fdda_quant
from synclint import hot_functions, loop_sync_calls, sync_calls

A = alq_import.load()

QUANTIZERS = {"dambq": dambq_quant, "alignq.quant": alignq_quant, "alignq.baselines": alignq_baselines,
              "fdda": fdda_quant}


@pytest.mark.parametrize("paper", sorted(QUANTIZERS))
def test_quantizer_forward_and_backward_have_no_host_sync(paper):
    funcs = dict(hot_functions(QUANTIZERS[paper]))
    must = {"dambq": {"_ClampSTE.forward", "_ClampSTE.backward", "quantize_wgt", "quantize_act", "lba_error_hook",
                      "nearest_level", "QuantConv2d.forward", "QuantLinear.forward"},
            "alignq.quant": {"uniform_q", "WeightQuant.forward", "ActQuant.forward", "ADMM.forward"},
            "alignq.baselines": {"_LLSQRound.backward", "_APoTWeightFn.forward", "LSQQuantizer.forward"},
            "fdda": {"AsymmetricQuantFunction.forward", "QuantAct.forward", "Quant_Conv2d.forward"}}[paper]
    assert must <= funcs.keys()          # a rename must not silently drop a hot path from the lint
    found = {n: sync_calls(f) for n, f in funcs.items()}
    assert not {n: b for n, b in found.items() if b}, found


PASSES = {"dambq.train": dambq_main.train, "dambq.validate": dambq_main.validate,
          "alignq.train_cls": alignq_engine.train_cls, "alignq.train_domain": alignq_engine.train_domain,
          "alignq.evaluate": alignq_engine.evaluate, "fdda.Trainer.train": fdda_trainer.Trainer.train,
          "fdda.evaluate": fdda_trainer.evaluate, "alq.run_epoch": A.train.run_epoch}
PER_STEP = {"alignq.sgd_step": alignq_engine.sgd_step, "alq.EpochStats.add": A.train.EpochStats.add,
            "alq._hits": A.train._hits, "dambq.collect_errors": dambq_quant._MultiBitMixin.collect_errors,
            "dambq.update_alpha_wgt": dambq_quant._MultiBitMixin.update_alpha_wgt}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_training_and_evaluation_loops_read_the_device_only_at_print_lines(name):
    assert loop_sync_calls(PASSES[name]) == []


@pytest.mark.parametrize("name", sorted(PER_STEP))
def test_per_step_helpers_have_no_host_sync(name):
    assert sync_calls(PER_STEP[name]) == []


def test_the_loop_lint_sees_a_per_batch_item_but_not_a_print_line_or_the_end():
    def sample(loader, args, meter):
        total = 0.0
        for i, (x, y) in enumerate(loader):
            loss = (x - y).abs().mean()
            if i % args.print_freq == 0:
                print(loss.item())                      # allowed: print interval
            meter.update(loss.item(), x.size(0))        # a sync every batch
        return float(total)                             # allowed: once, after the loop
    assert loop_sync_calls(sample) == [".item()"]


class _OneProcess:
    enabled, main = False, True


def _reference_stats(batches):
    """What EpochStats computed before (host floats): the mean of loss.item() over batches, top-k counts summed
    with .item() per batch."""
    loss, correct, total = 0.0, [0.0, 0.0], 0
    for loss_t, out, y in batches:
        pred = out.topk(5, 1, True, True).indices.t()
        hit = pred.eq(y.reshape(1, -1).expand_as(pred))
        for i, k in enumerate((1, 5)):
            correct[i] += hit[:k].reshape(-1).float().sum().item()
        loss += loss_t.item()
        total += y.size(0)
    return {"loss": loss / len(batches), "top1": 100.0 * correct[0] / total, "top5": 100.0 * correct[1] / total,
            "n": total}


def test_alq_device_epoch_stats_equal_the_host_sums_exactly_also_across_a_resume():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand((), generator=g) * 3, torch.randn(b, 10, generator=g),
                torch.randint(0, 10, (b,), generator=g)) for b in (128, 128, 77, 128, 5)]
    st = A.train.EpochStats(_OneProcess())
    for b in batches:
        st.add(*b)
    assert st.result() == _reference_stats(batches)      # the same doubles, added in the same order: exact
    first = A.train.EpochStats(_OneProcess())
    for b in batches[:2]:
        first.add(*b)
    resumed = A.train.EpochStats(_OneProcess())
    resumed.load(first.state())
    for b in batches[2:]:
        resumed.add(*b)
    assert resumed.result() == st.result()
