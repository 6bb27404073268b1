"""Fine-tuning and training: data loading, the resumable training loop, LoRA, evaluation.

    from neoj.train import TrainArgs, train
    train(TrainArgs(data=["notes.txt"], out="out", model="EleutherAI/gpt-neo-125m", max_steps=100))
"""

from .data import DataError, load_dataset, read_documents
from .loop import TrainArgs, TrainError, TrainResult, train
from .lora import LoraConfig, inject, load_adapter, merge, save_adapter

__all__ = ["TrainArgs", "TrainResult", "TrainError", "train", "DataError", "load_dataset", "read_documents",
           "LoraConfig", "inject", "merge", "save_adapter", "load_adapter"]
