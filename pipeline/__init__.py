"""coreg: distil a vision-language model's noisy candidate labels into a small classifier with Co-Reg."""

__version__ = "0.1.0"
