"""Batch-norm statistics (BNS) of a teacher: forward hooks on every BatchNorm2d, and the BNS-center files.

For each BN layer l (in execution order) the hook records the per-channel mean and biased variance of the
layer's input over (N, H, W) — the statistics FDDA aligns with the teacher's running statistics (the BNS
loss) and with the per-class centers (DBNS/CBNS). `per_sample=True` gives them per image (over H, W), which
is what BNScenters.py needs; batching images that way equals running them one by one.

BNS-center files (written by BNScenters.py into save_path, read by the trainer), each a torch.save of
nested dicts/lists/tensors/strings that loads with torch.load(weights_only=True), layout as the original:
  {model}_mean_Categorical_bs_1.pickle       {class: {class: [mean of BN layer 0, 1, ... L-1]}}
  {model}_var_Categorical_bs_1.pickle        {class: {class: [biased variance per BN layer]}}
  {model}_path_label_Categorical_bs_1.pickle {class: {class: ((image path,), tensor([class]))}}
  {model}_teacher_output_Categorical_1.pickle {class: teacher logits of that image, 1 x nClasses}
  {model}_calibration_images.txt             "class<TAB>path" per line: the replayable calibration set
  {model}_BNScenters.json                     how they were made: model_name, img_size, teacher, seed, sha256 of
                                              the four files (check_centers reads it)
"""
import json
import os

import torch
import torch.nn as nn

from common.checkpoint import load_checkpoint
from common.errors import UserError
from common.identity import sha256_file

FILES = {"mean": "{m}_mean_Categorical_bs_1.pickle", "var": "{m}_var_Categorical_bs_1.pickle",
         "path_label": "{m}_path_label_Categorical_bs_1.pickle",
         "teacher_output": "{m}_teacher_output_Categorical_1.pickle"}
LIST_FILE = "{m}_calibration_images.txt"
# what BNScenters.py made the four files from (teacher, img_size, seed, their sha256); not in the original
RECORD_FILE = "{m}_BNScenters.json"


class BNStats:
    """Hooks on every nn.BatchNorm2d of `model`; `mean`, `var`, `modules` fill in execution order per forward.

    Call clear() before each forward (the original let these lists, and the running statistics it appended
    at every forward, grow forever: a memory leak).
    """

    def __init__(self, model, per_sample=False):
        self.per_sample = per_sample
        self.active = True
        self.mean, self.var, self.modules = [], [], []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def _hook(self, module, inputs, output):
        if not self.active:
            return
        x = inputs[0]
        dims = (2, 3) if self.per_sample else (0, 2, 3)
        # two reductions, as the original's hook (torch.var_mean differs from them in the last bits)
        mean = x.mean(list(dims))
        var = x.var(list(dims), unbiased=False)
        self.mean.append(mean)
        self.var.append(var)
        self.modules.append(module)

    def clear(self):
        self.mean, self.var, self.modules = [], [], []

    def running_stats(self):
        """The recorded layers' running (mean, var), in execution order (valid after one forward)."""
        return [m.running_mean for m in self.modules], [m.running_var for m in self.modules]

    def remove(self):
        for h in self.handles:
            h.remove()


def bns_paths(save_path, model_name):
    return {k: os.path.join(save_path, v.format(m=model_name)) for k, v in FILES.items()}


def bnscenters_command(model_name):
    return f"python BNScenters.py --dataPath PathToImageNetDataset --model_name {model_name}"


def load_bns_centers(save_path, model_name, bn_layers):
    """(true_mean, true_var, path_label, teacher_output) as {class: [...]} lists; one line when files are missing,
    unreadable or made for another network (a different BN-layer count)."""
    paths = bns_paths(save_path, model_name)
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserError(f"BNS-center file {missing[0]} is missing ({len(missing)} of 4); make them with "
                        f"`{bnscenters_command(model_name)}` (run in fdda/, writes {save_path})")
    raw = {k: load_checkpoint(p, what="BNS-center file", flag=None) for k, p in paths.items()}
    classes = sorted(raw["mean"])
    if not classes or classes != list(range(len(classes))) or sorted(raw["var"]) != classes \
            or sorted(raw["path_label"]) != classes or sorted(raw["teacher_output"]) != classes:
        raise UserError(f"BNS-center files for {model_name} in {save_path} are inconsistent (classes differ "
                        f"between files); re-create them with `{bnscenters_command(model_name)}`")
    true_mean, true_var, path_label = {}, {}, {}
    for c in classes:
        (m,), (v,), (pl,) = raw["mean"][c].values(), raw["var"][c].values(), raw["path_label"][c].values()
        if len(m) != bn_layers or len(v) != bn_layers:
            raise UserError(f"BNS-center files in {save_path} hold {len(m)} BN layers per class but {model_name} "
                            f"has {bn_layers}: they were made for another network; re-create them with "
                            f"`{bnscenters_command(model_name)}`")
        true_mean[c], true_var[c] = list(m), list(v)
        path_label[c] = (pl[0][0], int(pl[1].reshape(-1)[0]))
    teacher_output = torch.cat([raw["teacher_output"][c].reshape(1, -1) for c in classes])
    return true_mean, true_var, path_label, teacher_output


def check_centers(save_path, model_name, img_size, channels, true_mean, true_var):
    """The BNS centers must describe this network at this image size; returns a note for the log.

    Every per-layer statistic must have the channel count of the network's BN layer at that place (`channels`,
    execution order: models.check_input_size). Statistics of the chosen images depend on their resolution, so
    the centers' record (RECORD_FILE, when its sha256 are those of the four files) must name this model_name
    and img_size; files without a record (the authors' pickles, or files replaced since) are checked by their
    shapes alone, and the note says so."""
    for c in sorted(true_mean):
        for layer, (m, v, n) in enumerate(zip(true_mean[c], true_var[c], channels)):
            if tuple(m.shape) != (n,) or tuple(v.shape) != (n,):
                raise UserError(f"BNS-center files in {save_path} hold statistics of {tuple(m.shape)} values for BN "
                                f"layer {layer} (class {c}) but {model_name}'s BN layer {layer} has {n} channels: "
                                f"they were made for another network; re-create them with "
                                f"`{bnscenters_command(model_name)}`")
    path = os.path.join(save_path, RECORD_FILE.format(m=model_name))
    try:
        with open(path) as f:
            made = json.load(f)
    except (OSError, ValueError):
        made = None
    if not isinstance(made, dict) or not isinstance(made.get("sha256"), dict) \
            or made["sha256"] != {k: sha256_file(p) for k, p in bns_paths(save_path, model_name).items()}:
        return (f"no record of how the BNS centers in {save_path} were made ({path} missing or not theirs): their "
                f"per-layer shapes fit {model_name}; their image size cannot be checked")
    if made.get("model_name") != model_name:
        raise UserError(f"the BNS centers in {save_path} were made for {made.get('model_name')} ({path}), not "
                        f"{model_name}; re-create them with `{bnscenters_command(model_name)}`")
    if made.get("img_size") != img_size:
        raise UserError(f"the BNS centers in {save_path} were made from {made.get('img_size')} px images ({path}) "
                        f"but img_size = {img_size}: their statistics do not describe {img_size} px images; pass "
                        f"--img_size {made.get('img_size')}, or re-create them with `{bnscenters_command(model_name)} "
                        f"--img_size {img_size}` (and --save_path DIR to keep these)")
    return f"BNS centers made from {img_size} px images by {made.get('teacher')} ({path})"


def correct_set(teacher_output):
    """Classes whose BNS-center image the teacher classifies correctly (the original's 'correct set')."""
    return {c for c, p in enumerate(teacher_output.argmax(1).tolist()) if p == c}
