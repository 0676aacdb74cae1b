"""FDDA step 1: BNS centers. One training image per class goes through the full-precision teacher; the
per-class BN statistics ("BNS centers"), the chosen image paths (the calibration set) and the teacher's
logits are written to ./save_ImageNet (see fdda/bns.py for the file layout).

    cd fdda && mkdir save_ImageNet && python BNScenters.py --dataPath PathToImageNetDataset --model_name resnet18

The original picked each class's image with a shuffled loader (not replicable across torch releases);
here a seeded generator picks it (--seed) and the choice is written to <model>_calibration_images.txt,
which --calib_list replays exactly.
"""
import argparse
import json
import os
import time

import torch

from common.checkpoint import save_checkpoint
from common.checks import check_range, check_writable_dir
from common.data import data_root
from common.device import get_device
from common.errors import UserError, cli
from common.identity import sha256_file
from common.meters import progress
from fdda import models
from fdda.bns import BNStats, LIST_FILE, RECORD_FILE, bns_paths, correct_set
from fdda.dataloader import imagenet_split, test_transform
from fdda.options import DATA_ENV

parser = argparse.ArgumentParser(description="FDDA: compute per-class BNS centers", allow_abbrev=False)
parser.add_argument("--dataPath", type=str, default=None,
                    help=f"ImageNet root with train/<wnid>/ (or imagenet/train/<wnid>/; default: ${DATA_ENV}, "
                         f"else the data root: $QUANTLAB_DATA, else ./data)")
parser.add_argument("--model_name", type=str, required=True, help=" | ".join(models.MODELS))
parser.add_argument("--save_path", default="./save_ImageNet", help="output folder (default ./save_ImageNet)")
parser.add_argument("--teacher_path", default=None,
                    help="pretrained weights file (default: the original's file in its store); 'random' = "
                         "random initialisation (smoke runs only)")
parser.add_argument("--seed", type=int, default=0, help="seed of the per-class image choice (default 0)")
parser.add_argument("--calib_list", default=None,
                    help="replay a <model>_calibration_images.txt instead of choosing images")
parser.add_argument("--img_size", type=int, default=224, help="center-crop size (default 224)")
parser.add_argument("--nClasses", type=int, default=1000, help="classes of the network's output layer")
parser.add_argument("--batch_size", type=int, default=16,
                    help="images per teacher forward (statistics are per image: any value gives the same centers)")
parser.add_argument("--gpu", type=int, default=None, help="CUDA device index (default: any GPU, else CPU)")
parser.add_argument("--overwrite", action="store_true",
                    help="replace existing BNS-center files of this model in --save_path (default: refuse)")


def choose_images(train, seed, calib_list):
    """[(class, path)] for every class of `train`: replayed from `calib_list`, or one seeded choice per class."""
    by_class = {}
    for path, label in train.samples:
        by_class.setdefault(label, []).append(path)
    if calib_list:
        if not os.path.isfile(calib_list):
            raise UserError(f"--calib_list {calib_list} does not exist")
        chosen = []
        with open(calib_list) as f:
            for n, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or not parts[0].isdigit():
                    raise UserError(f"--calib_list {calib_list} line {n} is not 'class<TAB>path'")
                chosen.append((int(parts[0]), parts[1]))
        if [c for c, _ in chosen] != list(range(len(train.classes))):
            raise UserError(f"--calib_list {calib_list} must list classes 0..{len(train.classes) - 1} in order, "
                            f"one image each (the dataset has {len(train.classes)} classes)")
        gone = [p for _, p in chosen if not os.path.isfile(p)]
        if gone:
            raise UserError(f"--calib_list image {gone[0]} does not exist ({len(gone)} missing)")
        return chosen
    g = torch.Generator().manual_seed(seed)
    return [(c, by_class[c][int(torch.randint(len(by_class[c]), (1,), generator=g))])
            for c in range(len(train.classes))]


def main():
    args = parser.parse_args()
    spec = models.check_model_name(args.model_name)
    data_path = args.dataPath or os.environ.get(DATA_ENV) or data_root()
    # checks before work: every range and the output folder, before any data is read
    check_range("--img_size", args.img_size, lo=32)
    check_range("--batch_size", args.batch_size, lo=1)
    check_range("--nClasses", args.nClasses, lo=1)
    check_range("--seed", args.seed, lo=0, hi=2 ** 63 - 1)
    check_range("--gpu", args.gpu, lo=0)
    check_writable_dir(args.save_path, "--save_path")
    existing = [p for p in bns_paths(args.save_path, args.model_name).values() if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists (BNS centers of {args.model_name}, used by training runs); "
                        f"pass --overwrite to replace them, or --save_path DIR for another set")
    models.check_input_size(args.model_name, args.img_size, args.nClasses, flag="--img_size")
    tf = test_transform(args.img_size)
    train = imagenet_split(data_path, "train", tf)            # one line if missing / not an ImageFolder
    if len(train.classes) > args.nClasses:
        raise UserError(f"{data_path}/train has {len(train.classes)} classes but the network has "
                        f"{args.nClasses} outputs (--nClasses)")
    chosen = choose_images(train, args.seed, args.calib_list)
    teacher, source = models.build_teacher(args.model_name, args.teacher_path, args.nClasses, args.seed)
    device = get_device(args.gpu)
    teacher.to(device)
    print(f"=> device {device}, seed {args.seed} (image choice), teacher {source}, {len(chosen)} classes -> "
          f"{os.path.abspath(args.save_path)}", flush=True)

    stats = BNStats(teacher, per_sample=True)
    mean, var, path_label, outputs = {}, {}, {}, {}
    t0 = time.time()
    from PIL import Image
    with torch.no_grad():
        for start in progress(range(0, len(chosen), args.batch_size), desc="BNS centers",
                              total=(len(chosen) + args.batch_size - 1) // args.batch_size):
            batch = chosen[start:start + args.batch_size]
            imgs = []
            for _, p in batch:
                try:
                    with open(p, "rb") as f:
                        img = Image.open(f).convert("RGB")
                except (OSError, SyntaxError, Image.DecompressionBombError) as e:
                    raise UserError(f"calibration image {p} cannot be decoded ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:100]}); remove or replace it, or pass --seed N "
                                    f"for another choice") from None
                imgs.append(tf(img))
            stats.clear()
            out = teacher(torch.stack(imgs).to(device)).cpu()
            if len(stats.mean) != spec.bn_layers:
                raise UserError(f"{args.model_name} ran {len(stats.mean)} BN layers, expected {spec.bn_layers}")
            for i, (c, p) in enumerate(batch):
                mean[c] = {c: [m[i].cpu().clone() for m in stats.mean]}
                var[c] = {c: [v[i].cpu().clone() for v in stats.var]}
                path_label[c] = {c: ((p,), torch.tensor([c]))}
                outputs[c] = out[i:i + 1].clone()
    stats.remove()
    os.makedirs(args.save_path, exist_ok=True)               # the README's `mkdir save_ImageNet`
    paths = bns_paths(args.save_path, args.model_name)
    for key, obj in (("mean", mean), ("var", var), ("path_label", path_label), ("teacher_output", outputs)):
        save_checkpoint(obj, paths[key])
    list_path = os.path.join(args.save_path, LIST_FILE.format(m=args.model_name))
    with open(list_path + ".tmp", "w") as f:
        f.writelines(f"{c}\t{os.path.abspath(p)}\n" for c, p in chosen)
    os.replace(list_path + ".tmp", list_path)
    right = correct_set(torch.cat([outputs[c] for c in sorted(outputs)]))
    with open(os.path.join(args.save_path, RECORD_FILE.format(m=args.model_name)), "w") as f:
        json.dump({"paper": "fdda", "stage": "BNScenters", "script": "fdda/BNScenters.py",
                   "sha256": {k: sha256_file(p) for k, p in paths.items()},
                   "model_name": args.model_name, "teacher": source, "dataPath": os.path.abspath(data_path),
                   "classes": len(chosen), "bn_layers": spec.bn_layers, "img_size": args.img_size,
                   "seed": args.seed, "calib_list": args.calib_list, "correct": len(right),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1)
    print(f"BNS centers of {len(chosen)} classes x {spec.bn_layers} BN layers ({args.model_name}, teacher {source}) "
          f"in {time.time() - t0:.1f}s; teacher correct on {len(right)}/{len(chosen)} chosen images")
    print(f"-> {', '.join(paths.values())}, {list_path}")


if __name__ == "__main__":
    cli(main)()
