"""AlignQ (CVPR 2022): CDF alignment quantization with ADMM-based correlation preservation.

Shared modules for the per-experiment entry points under cdf_alignment/ and cdf_alignment_admm/.
"""
