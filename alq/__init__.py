"""ALQ (CVPR 2020): adaptive loss-aware quantization for multi-bit networks. The scripts (lenet5.py, vgg.py,
resnet.py) run from this directory as in the original and import their modules from this package."""
