"""Secure-sum mechanisms behind the SumClient/SumServer interfaces."""
