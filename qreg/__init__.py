"""qreg: gradient-l1 regularization for quantization robustness (Alizadeh et al., ICLR 2020)."""
