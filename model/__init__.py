"""Continually trained retrieval models: the batch contract, id tables, losses and trainers."""

from ebrflow.model.base import Batch, RetrievalModel, TrainReport

__all__ = ["Batch", "RetrievalModel", "TrainReport"]
