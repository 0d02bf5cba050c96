"""Post-training quantization protocols as config overrides (docs/quantization.md, "Protocols").

- paper: the paper's setting and qreg's default: symmetric per-tensor weights,
  min-max activation ranges, every layer at the sweep's bits.
- strong: per-channel weights, MSE-optimal activation ranges, the first and
  last layer at 8 bits, empirical bias correction.
- strong+adaround: strong with AdaRound rounding (Nagel et al. 2020).
- cle, cle+bias_correction: the paper protocol after cross-layer equalization and bias
  absorption (Nagel et al. 2019), then with empirical bias correction.
- mixed: mixed precision (qreg.mixed) at MIXED_BUDGETS bits per weight on each sensitivity,
  per-channel weights (the deployment default), min-max activations at 8 bits; its bit settings
  are uniform widths with the same activations, to compare against.

LADDER adds one step at a time, to show what each buys.
"""
PAPER = {}
STRONG = {"quant.per_channel": True, "quant.calibration": "mse", "quant.first_last_bits": 8,
          "quant.bias_correction": True}
STRONG_ADAROUND = {**STRONG, "quant.adaround": True}
# Data-free fixes of per-tensor quantization (Nagel et al. 2019; qreg.equalize): cross-layer
# equalization with bias absorption, then with empirical bias correction too.
CLE = {"quant.cross_layer_equalization": True, "quant.bias_absorption": True}
CLE_BIAS_CORRECTION = {**CLE, "quant.bias_correction": True}
MIXED_BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
MIXED = {"quant.per_channel": True, "quant.bit_budgets": MIXED_BUDGETS,
         "quant.budget_sensitivities": ("measured", "bound", "hessian"),
         "quant.budget_act_bits": 8}
PROTOCOLS = {"paper": PAPER, "strong": STRONG, "strong+adaround": STRONG_ADAROUND,
             "cle": CLE, "cle+bias_correction": CLE_BIAS_CORRECTION, "mixed": MIXED}

LADDER = [
    ("paper", {}),
    ("+ per-channel", {"quant.per_channel": True}),
    ("+ MSE ranges", {"quant.calibration": "mse"}),
    ("+ 8-bit first/last", {"quant.first_last_bits": 8}),
    ("+ bias correction", {"quant.bias_correction": True}),
    ("+ AdaRound", {"quant.adaround": True}),
]
# The same, one data-free step at a time from the paper protocol (per-tensor throughout).
CLE_LADDER = [
    ("paper", {}),
    ("+ CLE", {"quant.cross_layer_equalization": True}),
    ("+ bias absorption", {"quant.bias_absorption": True}),
    ("+ bias correction", {"quant.bias_correction": True}),
]
# Down to 2 bits: the strong protocol moves where methods differ to lower widths.
LOW_BIT_SETTINGS = ((None, None), (8, 8), (6, 6), (5, 5), (4, 4), (3, 3), (2, 2),
                    (4, None), (None, 4), (2, 8), (2, None))
LADDER_BIT_SETTINGS = ((4, 4), (3, 3), (2, 2), (2, 8), (4, None), (2, None))
# AdaRound costs optimization time per weight bit-width: its table re-evaluates these only.
# The data-free protocols: per-tensor widths where the paper protocol breaks, and its float row
# (MobileNetV2's shows what replacing ReLU6 by ReLU costs).
CLE_BIT_SETTINGS = ((None, None), (8, 8), (6, 6), (5, 5), (4, 4), (3, 3), (2, 8), (4, None))
PROTOCOL_BIT_SETTINGS = {"strong+adaround": LADDER_BIT_SETTINGS,
                         "cle": CLE_BIT_SETTINGS, "cle+bias_correction": CLE_BIT_SETTINGS,
                         "mixed": ((None, None),) + tuple((b, 8) for b in (8, 6, 5, 4, 3, 2))}
