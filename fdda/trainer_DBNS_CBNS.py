"""FDDA trainer (the seed-era trainer_DBNS_CBNS.py): generator with BNS + DBNS/CBNS losses, student by KD.

Per iteration (iters_per_epoch of them):
  1. from epoch warmup_epochs on, a real batch of calibration images (one per class, RandomResizedCrop);
  2. G = generator(z, y), y uniform over the classes; teacher(G) with BN hooks;
     L_oh = CE(T(G), y);  L_BNS = BNLoss_weight * (1/L) sum_l [MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l)];
  3. every FDDA_iter iterations (cal_true_BNLoss): one class c (after correct_set_epoch only classes the teacher
     got right on their BNS-center image), a batch G_c of class c, s = floor((L+1)/2) - 2,
       DBNS = (1/(L-s)) sum_{l>=s} [MSE(mu_l, mu^c_l + 0.5 eps) + MSE(var_l, var^c_l + 1.0 eps')]  (fresh noise),
       CBNS = (1/(L-s)) sum_{l>=s} [MSE(mu_l, mu^c_l) + MSE(var_l, var^c_l)],
     and up to correct_set_epoch, for a class the teacher got wrong, DBNS = 2 (1/L) sum_l [MSE(mu_l, eps) +
     MSE(var_l, eps')] and CBNS = 0;  L_ohc = CE(T(G_c), c);
     L_G = 0.5 L_oh + L_BNS + D_w DBNS + 0.5 L_ohc + C_w CBNS   (else L_G = L_oh + L_BNS); Adam step;
  4. from warmup_epochs on, the student (eval mode: BN statistics fixed) learns on cat(real, G) from the
     teacher: KL(softmax(t/T) || softmax(s/T)) * alpha * T^2 + CE; Nesterov SGD, cosine lr per iteration.
     Before that, the student only runs forward on G (which calibrates its activation ranges while unfrozen).
"""
import random
import sys

import torch
import torch.nn.functional as F

from common import interrupt
from common.device import get_rng_state, set_rng_state
from common.errors import UserError
from common.meters import accuracy, progress
from common.runlog import epoch_label
from fdda.bns import BNStats
from fdda.dataloader import report_unreadable


def multi_step_lr(base, epoch, steps, decay, n_epochs):
    """The original's LRPolicy multi_step: base * decay^(number of milestones below epoch + 1); milestones
    <= 1 are fractions of n_epochs."""
    steps = sorted(steps)
    if steps and max(steps) <= 1:
        steps = [int(n_epochs * s) for s in steps]
    return base * decay ** sum(1 for s in steps if epoch + 1.0 > s)


def kd_loss(output, labels, teacher_output, T, alpha):
    """KL(softmax(t/T) || softmax(s/T)) (batchmean) * alpha * T^2 + CE(s, labels)."""
    kl = F.kl_div(F.log_softmax(output / T, dim=1), F.softmax(teacher_output / T, dim=1), reduction="batchmean")
    return kl * (alpha * T * T) + F.cross_entropy(output, labels)


def evaluate(model, loader, device, dist, desc="val", say=None):
    """(top1, top5, n, skipped) in percent over the whole loader, reduced over ranks (each rank holds a disjoint
    slice). Images that cannot be decoded (dataloader.SkipUnreadable) are left out and counted in `skipped`,
    each file named once through `say`; a validation set of which no image decodes is one error line."""
    model.eval()
    c1 = c5 = n = 0.0
    skipped = 0
    with torch.no_grad():
        for batch in progress(loader, desc=desc):
            images, labels, gone = batch if len(batch) == 3 else (batch[0], batch[1], ())
            if gone:
                skipped += report_unreadable(gone, say)
            if images is None:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            out = model(images)
            a1, a5 = accuracy(out, labels, topk=(1, 5))
            c1 += a1 * images.size(0) / 100.0
            c5 += a5 * images.size(0) / 100.0
            n += images.size(0)
    c1, c5, n, skipped = dist.sum_values([float(c1), float(c5), n, skipped])
    if n == 0 and skipped:
        raise UserError(f"none of the {int(skipped)} validation images can be decoded (see the warnings above); "
                        f"check dataPath's val/ folder")
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), int(n), int(skipped)


class Trainer:
    def __init__(self, model, model_teacher, generator, settings, true_mean, true_var, correct, n_classes,
                 bn_layers, start_layer, device, dist, true_data_loader=None, test_loader=None, log=None):
        self.settings = s = settings
        self.model, self.model_teacher, self.generator = model, model_teacher, generator
        self.device, self.dist, self.log = device, dist, log
        self.true_data_loader, self.test_loader = true_data_loader, test_loader
        self.n_classes, self.bn_layers, self.start_layer = n_classes, bn_layers, start_layer
        self.true_mean = {c: [t.to(device) for t in v] for c, v in true_mean.items()}
        self.true_var = {c: [t.to(device) for t in v] for c, v in true_var.items()}
        self.correct = set(correct)
        self.stats = BNStats(model_teacher)          # hooks registered once (the original: at epoch 0 only)
        self.running = None                          # teacher running (mean, var) in execution order
        self.optimizer_S = torch.optim.SGD(model.parameters(), lr=s.lr_S, momentum=s.momentum,
                                           weight_decay=s.weightDecay, nesterov=True)
        self.scheduler_S = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer_S, T_max=s.cosine_epochs * s.iters_per_epoch, eta_min=0.0)
        self.optimizer_G = torch.optim.Adam(generator.parameters(), lr=s.lr_G, betas=(s.b1, s.b2))
        self._iterator, self._iter_state = None, None
        self.step = 0

    # ------------------------------------------------------------------ losses

    def _teacher(self, images):
        """Teacher forward with fresh BN statistics lists (the fix for the original's ever-growing lists)."""
        self.stats.clear()
        out = self.model_teacher(images)
        if self.running is None:
            if len(self.stats.mean) != self.bn_layers:
                raise RuntimeError(f"teacher ran {len(self.stats.mean)} BN layers, expected {self.bn_layers}")
            self.running = self.stats.running_stats()
        return out

    def bns_loss(self):
        """(1/L) sum_l MSE(mu_l, running_mean_l) + MSE(var_l, running_var_l) of the last teacher forward."""
        rm, rv = self.running
        total = sum(F.mse_loss(m, a) + F.mse_loss(v, b) for m, v, a, b in zip(self.stats.mean, self.stats.var, rm, rv))
        return total / len(self.stats.mean)

    def sample_class(self, epoch):
        c = random.randint(0, self.n_classes - 1)
        if epoch > self.settings.correct_set_epoch and self.correct:   # an empty set would loop forever
            while c not in self.correct:
                c = random.randint(0, self.n_classes - 1)
        return c

    def cal_true_BNLoss(self, epoch):
        """(DBNS, CE of the class batch, CBNS) for one sampled class."""
        s = self.settings
        c = self.sample_class(epoch)
        # drawn on the CPU and moved, as the original (`torch.randn(...).cuda()`): the same stream on any device
        z = torch.randn(s.batchSize, s.latent_dim).to(self.device)
        labels = torch.randint(c, c + 1, (s.batchSize,)).to(self.device)   # draws, as the original: same RNG stream
        out = self._teacher(self.generator(z, labels))
        mean, var = self.stats.mean, self.stats.var
        if epoch <= s.correct_set_epoch and c not in self.correct:
            # CPU noise moved to the device, as the original's `torch.randn(shape).cuda()`
            d = sum(F.mse_loss(m, torch.randn(v.shape).to(self.device)) + F.mse_loss(v, torch.randn(v.shape).to(self.device))
                    for m, v in zip(mean, var))
            d_bns = 2.0 * d / len(mean)
            c_bns = torch.zeros((), device=self.device)
        else:
            tm, tv = self.true_mean[c], self.true_var[c]
            layers = range(self.start_layer, len(mean))
            d_bns = sum(F.mse_loss(mean[n], tm[n] + s.dbns_mean_std * torch.randn_like(tm[n]))
                        + F.mse_loss(var[n], tv[n] + s.dbns_var_std * torch.randn_like(tv[n])) for n in layers)
            c_bns = sum(F.mse_loss(mean[n], tm[n]) + F.mse_loss(var[n], tv[n]) for n in layers)
            d_bns, c_bns = d_bns / len(layers), c_bns / len(layers)
        return d_bns, F.cross_entropy(out, labels), c_bns

    # ------------------------------------------------------------------ training

    def update_lr(self, epoch):
        s = self.settings
        lr = multi_step_lr(s.lr_G, epoch, s.step_G, s.decayRate_G, s.nEpochs)
        for g in self.optimizer_G.param_groups:
            g["lr"] = lr
        return lr

    def _new_iterator(self):
        """A fresh (reshuffled) iterator of the calibration set; what it was made from is remembered (the RNG
        before it was made and before its first draw, and the batches drawn) so that a checkpoint inside an
        epoch can rebuild it at the same place (restore_iterator)."""
        self._iterator, self._iter_state = None, None
        if self.true_data_loader is not None:
            self._iter_state = {"iter_rng": get_rng_state(), "first_rng": None, "drawn": 0}
            self._iterator = iter(self.true_data_loader)

    def _real_batch(self):
        if self._iter_state["drawn"] == 0:
            self._iter_state["first_rng"] = get_rng_state()     # the sampler draws its order at the first batch
        try:
            batch = next(self._iterator)
        except StopIteration:                                  # the original's 're-iterator of true_data_loader'
            self._new_iterator()
            self._iter_state["first_rng"] = get_rng_state()
            batch = next(self._iterator)
        self._iter_state["drawn"] += 1
        images, _, labels = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def restore_iterator(self, state):
        """Rebuild the calibration iterator an interrupted epoch was using: made from the same RNG state, the
        same order, advanced by the batches it had given; the RNG is left as it was."""
        if state is None or self.true_data_loader is None:
            return
        now = get_rng_state()
        set_rng_state(state["iter_rng"])
        self._iterator = iter(self.true_data_loader)
        if state["drawn"]:
            set_rng_state(state["first_rng"])
            for _ in range(state["drawn"]):
                next(self._iterator)
        self._iter_state = dict(state)
        set_rng_state(now)

    def stop_requested(self):
        """SIGINT/SIGTERM arrived (common.interrupt); under torchrun every rank stops at the same iteration."""
        flag = interrupt.requested() is not None
        if self.dist.enabled:
            flag = self.dist.sum_values([float(flag)])[0] > 0
        return flag

    def train(self, epoch, start=0, sums=None, on_interrupt=None, eta=None):
        """One epoch; returns a dict of epoch-mean losses and the teacher's accuracy on G (host sync once).

        start, sums: continue an epoch interrupted after `start` iterations, with its running loss sums (the
        calibration iterator restored by restore_iterator). on_interrupt(i, sums): after iteration i when a
        signal arrived. eta: common.runs.ETA (whole-run estimate after the first iterations)."""
        s = self.settings
        lr_G = self.update_lr(epoch)
        self.model.eval()                 # the student's BN statistics stay fixed; its affine params learn
        self.model_teacher.eval()
        self.generator.train()
        student_phase = epoch >= s.warmup_epochs
        if start == 0 or self._iterator is None:
            # a fresh (reshuffled) iterator every epoch, created before the first draw, as the original
            self._new_iterator()
        keys = ("loss_G", "one_hot", "BNS", "D_BNS", "one_hot_BNScenters", "C_BNS", "loss_S", "fp_acc")
        if sums is None:
            sums = {k: torch.zeros((), device=self.device) for k in keys}
        sums = {k: sums[k].to(self.device) for k in keys}
        for i in progress(range(start, s.iters_per_epoch), desc=epoch_label(epoch, s.nEpochs)):
            if student_phase:
                images, labels = self._real_batch()
            z = torch.randn(s.batchSize, s.latent_dim).to(self.device)          # CPU draws, as the original
            G_labels = torch.randint(0, self.n_classes, (s.batchSize,)).to(self.device)
            G_images = self.generator(z, G_labels)
            G_out_T = self._teacher(G_images)
            one_hot = F.cross_entropy(G_out_T, G_labels)
            bns = s.BNLoss_weight * self.bns_loss()
            if s.use_FDDA and i % s.FDDA_iter == 0:
                d_bns, oh_c, c_bns = self.cal_true_BNLoss(epoch)
                d_bns, c_bns, oh_c, one_hot = s.D_BNSLoss_weight * d_bns, s.C_BNSLoss_weight * c_bns, 0.5 * oh_c, \
                    0.5 * one_hot
                loss_G = one_hot + bns + d_bns + oh_c + c_bns
                sums["D_BNS"] += d_bns.detach()
                sums["C_BNS"] += c_bns.detach()
                sums["one_hot_BNScenters"] += oh_c.detach()
            else:
                loss_G = one_hot + bns
            self.optimizer_G.zero_grad(set_to_none=True)
            loss_G.backward()
            self.dist.average_gradients(list(self.generator.parameters()))
            self.optimizer_G.step()

            G_images, G_out_T = G_images.detach(), G_out_T.detach()
            if student_phase:
                with torch.no_grad():                # no BN statistics are needed from real images
                    self.stats.active = False
                    out_T_real = self.model_teacher(images)
                    self.stats.active = True
                output = self.model(torch.cat((images, G_images)))
                loss_S = kd_loss(output, torch.cat((labels, G_labels)), torch.cat((out_T_real, G_out_T)),
                                 s.temperature, s.alpha)
                self.optimizer_S.zero_grad(set_to_none=True)
                loss_S.backward()
                self.dist.average_gradients(list(self.model.parameters()))
                self.optimizer_S.step()
                self.scheduler_S.step()
                sums["loss_S"] += loss_S.detach()
            else:
                with torch.no_grad():     # calibrates the activation ranges while they are unfrozen
                    self.model(G_images)
            self.stats.clear()
            sums["loss_G"] += loss_G.detach()
            sums["one_hot"] += one_hot.detach()
            sums["BNS"] += bns.detach()
            sums["fp_acc"] += (G_out_T.argmax(1) == G_labels).float().mean()
            self.step += 1
            if eta is not None:
                eta.batch(i, start)
            if on_interrupt is not None and self.stop_requested():
                on_interrupt(i, sums)
        out = {k: float(v) / s.iters_per_epoch for k, v in sums.items()}
        out["fp_acc"] *= 100.0
        out["lr_G"], out["lr_S"] = lr_G, self.optimizer_S.param_groups[0]["lr"]
        # every rank generated its own batches: give all ranks rank 0's buffers (activation ranges, BN stats)
        self.dist.broadcast_module(self.model, params=False)
        self.dist.broadcast_module(self.generator, params=False)
        return out

    def _say(self, msg):
        """Rank 0's log; another rank's skipped files (its own slice of val) go to its stderr."""
        if self.log is not None and self.dist.main:
            self.log.info(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def test(self):
        """(top1, top5, n, skipped unreadable images)"""
        return evaluate(self.model, self.test_loader, self.device, self.dist, desc="val (student)", say=self._say)

    def test_teacher(self):
        self.stats.active = False         # no statistics are needed (nor kept) while evaluating
        try:
            return evaluate(self.model_teacher, self.test_loader, self.device, self.dist, desc="val (teacher)",
                            say=self._say)
        finally:
            self.stats.active = True

    def state_dict(self, iterator=False):
        """Optimizers, schedule and step; iterator=True (a checkpoint inside an epoch): also where the
        calibration iterator is."""
        state = {"optimizer_S": self.optimizer_S.state_dict(), "scheduler_S": self.scheduler_S.state_dict(),
                 "optimizer_G": self.optimizer_G.state_dict(), "step": self.step}
        if iterator and self._iter_state is not None:
            state["iterator"] = self._iter_state
        return state

    def load_state_dict(self, state):
        self.optimizer_S.load_state_dict(state["optimizer_S"])
        self.scheduler_S.load_state_dict(state["scheduler_S"])
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.step = int(state["step"])
