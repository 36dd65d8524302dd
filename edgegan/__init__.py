"""EdgeGAN: one GAN trained across many edge devices whose data never leaves them."""

__version__ = "0.1.0"
