"""ZeroQ-style asymmetric fake quantization used by FDDA (weights per output channel, activations per tensor)."""
from fdda.quantization_utils.quant_modules import (
    MAX_BITS, MIN_BITS, AsymmetricQuantFunction, QuantAct, Quant_Conv2d, Quant_Linear,
    asymmetric_linear_quantization_params, check_bits, freeze_model, quantize_model, quantizer_bits, unfreeze_model)

__all__ = ["MAX_BITS", "MIN_BITS", "AsymmetricQuantFunction", "QuantAct", "Quant_Conv2d", "Quant_Linear",
           "asymmetric_linear_quantization_params", "check_bits", "freeze_model", "quantize_model", "quantizer_bits",
           "unfreeze_model"]
