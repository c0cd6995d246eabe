"""Differential privacy: accounting, the per-client privacy ledger and its audit."""
