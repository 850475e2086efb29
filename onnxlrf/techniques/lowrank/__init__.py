"""Low-rank factorization: planners, the factor-pair rewrite, and the refit."""
