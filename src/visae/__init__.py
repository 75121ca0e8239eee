"""visae: understand vision models with sparse autoencoders.

The SAE lives in `visae.sae` (`from visae.sae import SAE`); this module holds only the version,
so that reading it imports nothing else (no torch, no import cycle through the packages that
record it in their artifacts).
"""

__version__ = "0.1.0"
