"""Typed messages and their binary codec; no transport here."""

from .codec import DEFAULT_MAX_BYTES, Array, MaxLen, Message, decode, encode, message
from .messages import TrainIns, TrainRes

__all__ = ["DEFAULT_MAX_BYTES", "Array", "MaxLen", "Message", "TrainIns", "TrainRes", "decode", "encode", "message"]
