"""Training language models on local text: data and tokenizer, the training loop, atomic checkpoints, generation
from a checkpoint, and the dense-vs-MoE comparison.

    from moekit.train import TrainConfig, train
    result = train(TrainConfig(preset="tiny-mixtral", out="runs/mix", steps=300))
"""

from moekit.train.checkpoint import CheckpointError, load_model
from moekit.train.compare import CompareConfig, CompareResult, compare
from moekit.train.data import DataError, Document, Tokenizer, TokenStream, embedded_corpus, load_documents, prepare_data
from moekit.train.sample import GeneratedText, generate_text
from moekit.train.trainer import TrainConfig, Trainer, TrainResult, lr_at, training_config, train

__all__ = [
    "CheckpointError", "CompareConfig", "CompareResult", "DataError", "Document", "GeneratedText", "TokenStream",
    "Tokenizer", "TrainConfig", "TrainResult", "Trainer", "compare", "embedded_corpus", "generate_text",
    "load_documents", "load_model", "lr_at", "prepare_data", "training_config", "train",
]
