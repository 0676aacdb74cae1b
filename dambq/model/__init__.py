"""DAMBQ model code: the quantized layers (quant_layers) and the module swap + LBA tuner (quant_tune)."""
from dambq.model.quant_layers import (ALPHA_W, CLIP_W, QUANT_BASES, FirstConv2d, LastLinear, QuantConv2d, QuantLinear,
                                      quantize_act, quantize_wgt, round_pass)
from dambq.model.quant_tune import QuantTune, convert2quant_module

__all__ = ["ALPHA_W", "CLIP_W", "QUANT_BASES", "FirstConv2d", "LastLinear", "QuantConv2d", "QuantLinear",
           "QuantTune", "convert2quant_module", "quantize_act", "quantize_wgt", "round_pass"]
