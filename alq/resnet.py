"""ALQ on ResNet18/34 / ILSVRC12 (Qu et al., CVPR 2020):

    python resnet.py --PRETRAIN --DOWNLOAD --ALQ --POSTTRAIN --net resnet18 --data /PATH/TO/ILSVRC12
    torchrun --nproc_per_node=N resnet.py --PRETRAIN --ALQ --POSTTRAIN --net resnet18 --data ...   # N GPUs (DDP)

Under torchrun --batch_size (and --workers) is the total over the N processes, as the original's DataParallel
split each batch over the GPUs.
Published (README): ResNet18 2.00 bits, 3.44 MB, 70.0 %; ResNet34 2.00 bits, 6.37 MB, 73.6 % (top-1 on val).
--data holds train/<wnid>/*.JPEG and val/ either as class folders or flat (val/ILSVRC2012_val_*.JPEG, then
--val_labels names the ground-truth file). --DOWNLOAD takes torchvision's FP weights (--model_ori_urls).
"""
import os

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import models, transforms

from alq.checkpoints import load_net_state, save_model_ori
from alq.options import alq_argparser
from alq.stages import pretrain, run_pipeline
from alq.train import split_indices
from common.checkpoint import load_checkpoint, strip_module_prefix
from common.data import imagenet
from common.errors import UserError, run_main
from common.results import recipe_info

DEFAULTS = dict(val_size=50000, model_ori="./resnet_model_ori.pth", model="./resnet_model.pth", lr=2e-4, R=5,
                epoch_basis=10, epoch_coord=5, ld_coord=0.6, pr=0.15, top_k=0.0005, batch_size=256, workers=16,
                pretrain_epochs=90, post_epochs=[80, 20])
URLS = {"resnet18": "https://download.pytorch.org/models/resnet18-5c106cde.pth",
        "resnet34": "https://download.pytorch.org/models/resnet34-333f7ec4.pth"}
# torchvision's ResNet-18/34: the layout and parameter names of the published FP weights (Kaiming init)
NETS = {"resnet18": models.resnet18, "resnet34": models.resnet34}
NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def fill_net_defaults(args):
    """Per-net defaults, filled after parsing as in the original: channelwise first conv, pixelwise convs
    (1x1 downsample convs included), subchannelwise (2) fc, 8 bases each."""
    n_conv = 20 if args.net == "resnet18" else 36
    if args.structure is None:
        args.structure = ["channelwise"] + ["pixelwise"] * (n_conv - 1) + ["subchannelwise"]
    if args.max_bit is None:
        args.max_bit = [8] * (n_conv + 1)  # the original suggests some 6s for GPUs with little memory
    if args.subc is None:
        args.subc = [0] * n_conv + [2]
    if args.model_ori_urls is None:
        args.model_ori_urls = URLS[args.net]
    return args


def data_transforms():
    """(train, test) transforms of the original: RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224)."""
    return (transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), NORMALIZE]),
            transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), NORMALIZE]))


def make_loaders(args):
    train_tf, test_tf = data_transforms()
    train_full = imagenet(args.data, "train", train_tf)
    test_set = imagenet(args.data, "val", test_tf, val_labels=args.val_labels)
    val_idx, train_idx = split_indices(len(train_full), args.val_size, args.seed)
    if args.train_limit:
        train_idx = train_idx[:args.train_limit]
    val_src = imagenet(args.data, "train", test_tf) if args.val_no_aug else train_full
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=torch.cuda.is_available())
    return (DataLoader(Subset(train_full, train_idx.tolist()), shuffle=True, **kw),
            DataLoader(Subset(val_src, val_idx.tolist()), shuffle=False, **kw),
            DataLoader(test_set, shuffle=False, **kw))


def download_weights(url):
    """torchvision's FP weights: a local path, a file:// URL, or a URL fetched into torch's hub cache."""
    if os.path.isfile(url):
        path = url
    else:
        fname = os.path.basename(url.split("?")[0])
        path = os.path.join(torch.hub.get_dir(), "checkpoints", fname)
        if not os.path.isfile(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(url, path, progress=True)
            except Exception as e:  # noqa: BLE001 - no network: one clear line naming the file to provide
                raise UserError(f"--DOWNLOAD could not fetch {url} ({type(e).__name__}); put that file at {path} "
                                f"or pass --model_ori_urls /path/to/{fname}") from None
    return strip_module_prefix(load_checkpoint(path, what="pretrained weights", flag="--model_ori_urls"))


def make_pretrain_recipe(args):
    def run(ctx):
        if args.DOWNLOAD:
            net = ctx.build_net().to(ctx.device)
            weights = ctx.dist.main_first(lambda: download_weights(args.model_ori_urls))   # one download
            load_net_state(net, {"net_state_dict": weights}, args.model_ori_urls, "--model_ori_urls")
            ctx.evaluate(net, "val")
            ctx.evaluate(net, "test")
            optimizer = torch.optim.SGD(net.parameters(), lr=0.4, nesterov=True, momentum=0.9, weight_decay=1e-4)
            ident = ctx.ident("PRETRAIN", recipe_info(note="torchvision's pretrained weights (--DOWNLOAD), as the "
                                                           "README's commands"))
            if ctx.dist.main:
                save_model_ori(args.model_ori, net, optimizer, finished=True, quantlab=dict(ident, finished=True))
            return
        # from scratch, following https://openreview.net/pdf?id=S1gSj0NKvB as the original does

        def lr_schedule(optimizer, epoch):
            if epoch < 5:
                optimizer.param_groups[0]["lr"] = 0.4 * (epoch + 1) / 5
            if epoch in (30, 60, 80):
                optimizer.param_groups[0]["lr"] *= 0.1
        return pretrain(ctx, lambda net: torch.optim.SGD(net.parameters(), lr=0.4, nesterov=True, momentum=0.9,
                                                         weight_decay=1e-4), lr_schedule, args.pretrain_epochs)
    return run


def get_parser():
    p = alq_argparser("ALQ: adaptive loss-aware quantization of ResNet18/34 on ILSVRC12", DEFAULTS,
                      "ILSVRC12 dataset directory (train/<wnid>/*.JPEG; val/ as class folders, or flat with "
                      "--val_labels)")
    p.add_argument("--net", type=str, default="resnet18", choices=["resnet18", "resnet34"],
                   help="the network architecture")
    p.add_argument("--DOWNLOAD", action="store_true",
                   help="download a pretrained full precision resnet model as the original model")
    p.add_argument("--model_ori_urls", type=str, default=None,
                   help="download url (or local file) of the pretrained full precision resnet model "
                        "(default: torchvision's resnet18-5c106cde.pth / resnet34-333f7ec4.pth)")
    p.add_argument("--val_labels", type=str, default=None, metavar="FILE",
                   help="ground truth for a flat val/ folder (e.g. the devkit's "
                        "ILSVRC2012_validation_ground_truth.txt; see common/data.py for the accepted forms)")
    return p


def main(argv=None):
    args = fill_net_defaults(get_parser().parse_args(argv))
    run_pipeline(args, args.net, "imagenet", NETS[args.net], make_loaders,
                 make_pretrain_recipe(args), post_coord_lr=5e-6, split_name="val")


if __name__ == "__main__":
    run_main(main)
