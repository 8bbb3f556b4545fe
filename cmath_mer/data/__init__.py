from .dataset import IGNORE_INDEX, SPLITS, Batch, ConversationDataset, DataError

__all__ = ["IGNORE_INDEX", "SPLITS", "Batch", "ConversationDataset", "DataError"]
