import torch

# Small models run fastest on one thread, and a shared CI core pair punishes OpenMP's spinning.
torch.set_num_threads(1)
