"""Transferability: which pre-trained model, and which of its layers, to transfer from (DEPARA)."""
