"""DAMBQ (CVPR 2021): distribution-aware multi-bit quantization with loss-aware bit-width allocation."""
