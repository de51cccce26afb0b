"""Fairness and admission policies (pure; time is an argument)."""
