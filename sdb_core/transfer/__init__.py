"""Transferability: which pre-trained model, and which of its layers, to transfer from (DEPARA).

This module imports no torch: what the service and the CLI read without torch is defined here, once."""

# The methods ``depara.rank_transferability`` ranks the sources by (see ``depara``); ``depara`` imports them.
METHODS = ("depara", "depara_v", "depara_e", "rsa", "random")

# Probe images the CLI and the job read by default. Both validation zoos of benchmarks/depara.py chose 250 or
# 1,000 for DEPARA's setting, and 250 scored within 0.01 mean Spearman of 1,000 on each (0.556 vs 0.558, 0.447
# vs 0.440); fewer were never measured. Here, not in depara.py, so that reading the default imports no torch.
DEFAULT_PROBE = 250
