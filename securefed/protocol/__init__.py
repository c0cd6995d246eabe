"""Typed messages and their binary codec; no transport here."""

from .codec import DEFAULT_MAX_BYTES, Array, MaxLen, Message, decode, encode, message
from .messages import EvaluateIns, EvaluateRes, FinalIns, FinalRes, PlainModel, TrainIns, TrainRes
from .seeds import ReplicaHead, SeedHistory, SeedUpdate  # registered for every decoder: see seeds.py

__all__ = ["DEFAULT_MAX_BYTES", "Array", "EvaluateIns", "EvaluateRes", "FinalIns", "FinalRes", "MaxLen", "Message",
           "PlainModel", "ReplicaHead", "SeedHistory", "SeedUpdate", "TrainIns", "TrainRes", "decode", "encode",
           "message"]
