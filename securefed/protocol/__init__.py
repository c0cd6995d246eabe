"""Typed messages and their binary codec; no transport here."""

from .codec import DEFAULT_MAX_BYTES, Array, MaxLen, Message, decode, encode, message
from .messages import EvaluateIns, EvaluateRes, FinalIns, FinalRes, PlainModel, TrainIns, TrainRes

__all__ = ["DEFAULT_MAX_BYTES", "Array", "EvaluateIns", "EvaluateRes", "FinalIns", "FinalRes", "MaxLen", "Message",
           "PlainModel", "TrainIns", "TrainRes", "decode", "encode", "message"]
