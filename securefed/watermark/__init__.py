"""Ownership watermarks: FedIPR feature bits in normalization scales, key-derived trigger sets, verification."""
