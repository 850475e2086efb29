"""Low-rank factorization: planners, the factor-pair rewrite, the refit, and the technique object."""
