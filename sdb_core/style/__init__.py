"""Neural style transfer (review: arXiv 1705.04058): Gatys optimisation, per-style feed-forward
networks (Johnson et al.), arbitrary style with AdaIN (Huang & Belongie), one module each."""
