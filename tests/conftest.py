import torch

# Two torch threads on a two-core machine collapse (5-50x) whenever anything else runs;
# one thread keeps the suite's timing steady.
torch.set_num_threads(1)
