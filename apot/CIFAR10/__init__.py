"""APoT on CIFAR-10: the old quantizer generation (models/quant_layer.py), CIFAR ResNets and main.py."""
