"""The plan passed from analysis to rewrite (versioned JSON a user can read and edit) and the knapsack."""
