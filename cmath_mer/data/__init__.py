"""Data: the packed ConversationDataset, peers' pickles, the project's safetensors format, synthetic data."""
from .dataset import IGNORE_INDEX, SPLITS, Batch, ConversationDataset, DataError
from .peer_pickles import PEER_PICKLE_LAYOUTS, PeerPickleLayout, detect_layout, load_peer_pickle, write_peer_pickle
from .safe_pickle import ALLOWED_GLOBALS, SafeUnpickler, UnsafePickleError, safe_load_pickle
from .store import FORMAT, convert, file_format, load_dataset, load_safetensors, save_dataset, synth
from .synthetic import DEFAULT_SIGNAL, make_synthetic
from .validate import check_compatible, validate_dataset

__all__ = [
    "IGNORE_INDEX", "SPLITS", "Batch", "ConversationDataset", "DataError",
    "ALLOWED_GLOBALS", "PEER_PICKLE_LAYOUTS", "PeerPickleLayout", "SafeUnpickler", "UnsafePickleError", "detect_layout",
    "load_peer_pickle", "safe_load_pickle", "write_peer_pickle",
    "FORMAT", "convert", "file_format", "load_dataset", "load_safetensors", "save_dataset", "synth",
    "DEFAULT_SIGNAL", "make_synthetic",
    "check_compatible", "validate_dataset",
]
