import torch

# Tiny models on a small shared CPU: one intra-op thread is many times faster
# than two threads fighting another process for the cores.
torch.set_num_threads(1)
