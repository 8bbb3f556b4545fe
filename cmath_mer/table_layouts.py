"""The conversation-table layouts (which column plays which role) and the check that a table has the
columns it needs, with a ready `--columns` suggestion when it does not. Torch-free, unlike the rest of
featurize/: the command line checks a table's header before it imports torch, so a wrong column costs a
moment, not a torch import. featurize/tables.py reads the rows."""
from __future__ import annotations

import csv
import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from cmath_mer.model.config import PRESETS

ROLES = ("conversation", "utterance", "speaker", "text", "label", "split", "audio", "visual")
REQUIRED = ("conversation", "utterance", "speaker", "text")
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "dev": "valid",
               "test": "test"}
# EmoryNLP's 7 emotions in sorted order, as the peers (COSMIC, DialogueRNN) index them
EMORYNLP_CLASSES = ("Joyful", "Mad", "Neutral", "Peaceful", "Powerful", "Sad", "Scared")


@dataclass(frozen=True)
class TableLayout:
    """A conversation table's layout: which column plays which role (not a peer pickle's: data/peer_pickles)."""
    name: str
    columns: dict[str, str]                  # role -> column ('A+B+C': several columns make the value)
    class_names: tuple[str, ...] | None      # None: --class-names, else the sorted labels seen
    detect: tuple[str, ...] = ()             # columns whose presence identifies the layout


TABLE_LAYOUTS = {
    "emorynlp": TableLayout("emorynlp", {"conversation": "Season+Episode+Scene_ID", "utterance": "Utterance_ID",
                                         "speaker": "Speaker", "text": "Utterance", "label": "Emotion",
                                         "split": "split", "audio": "audio", "visual": "visual"},
                            EMORYNLP_CLASSES, ("Scene_ID", "Season", "Episode", "Utterance_ID", "Utterance")),
    "meld": TableLayout("meld", {"conversation": "Dialogue_ID", "utterance": "Utterance_ID", "speaker": "Speaker",
                                 "text": "Utterance", "label": "Emotion", "split": "split", "audio": "audio",
                                 "visual": "visual"},
                        PRESETS["meld"]["class_names"], ("Dialogue_ID", "Utterance_ID", "Utterance")),
    "generic": TableLayout("generic", {"conversation": "conversation_id", "utterance": "utterance_id",
                                       "speaker": "speaker", "text": "text", "label": "label", "split": "split",
                                       "audio": "audio", "visual": "visual"}, None),
}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'train_sent_emo.csv:train' -> ('train_sent_emo.csv', 'train'); a ':' not followed by a split name
    stays part of the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.lower() in SPLIT_NAMES:
        return head, SPLIT_NAMES[tail.lower()]
    return spec, None


def detect_layout(columns: list[str]) -> str:
    for name, layout in TABLE_LAYOUTS.items():
        if layout.detect and all(c in columns for c in layout.detect):
            return name
    return "generic"


# Column names a table of one's own often uses for a role: the --columns suggestion maps a missing role to
# the table's column that matches one of these (case and punctuation aside), else to the closest name.
ROLE_NAMES = {
    "conversation": ("conversation_id", "conversation", "conv_id", "dialogue_id", "dialog_id", "dialogue",
                     "dialog", "session_id", "session", "thread_id", "thread", "chat_id", "call_id"),
    "utterance": ("utterance_id", "utt_id", "turn_id", "turn", "turn_index", "index", "order", "position",
                  "seq", "line", "message_id", "utterance_index"),
    "speaker": ("speaker", "speaker_id", "speaker_name", "who", "role", "participant", "person", "author",
                "character", "sender", "name"),
    "text": ("text", "utterance", "transcript", "transcription", "sentence", "content", "message", "line_text"),
    "label": ("label", "emotion", "emotion_label", "feeling", "mood", "class", "target", "sentiment",
              "category"),
}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def guess_column(role: str, header: list[str], taken: set[str]) -> str | None:
    """The table's column most likely meant for `role`, None when nothing is close."""
    free = [c for c in header if c not in taken]
    by_norm = {_norm(c): c for c in reversed(free)}
    names = ROLE_NAMES.get(role, (role,))
    for name in names:
        if _norm(name) in by_norm:
            return by_norm[_norm(name)]
    for name in (role, *names):
        close = difflib.get_close_matches(_norm(name), list(by_norm), n=1, cutoff=0.75)
        if close:
            return by_norm[close[0]]
    return None


def missing_columns(name: str, header: list[str], layout_name: str, given: dict[str, str] | None) -> str | None:
    """None when the table has every column it needs: those of the required roles, and those --columns
    names (a mapped column that is not there is never silently ignored). Else one line naming every missing
    column at once, the columns the file has, and a --columns value to try."""
    given = dict(given or {})
    cols = {**TABLE_LAYOUTS[layout_name].columns, **given}
    roles = list(REQUIRED) + [r for r in given if r not in REQUIRED]
    missing = [(role, [c for c in cols[role].split("+") if c not in header]) for role in roles]
    missing = [(role, absent) for role, absent in missing if absent]
    if not missing:
        return None
    taken = {c for role in cols if role not in dict(missing) for c in cols[role].split("+") if c in header}
    mapping = {r: v for r, v in given.items() if r not in dict(missing)}
    for role, _ in missing:
        guess = guess_column(role, header, taken)
        mapping[role] = guess or "NAME"
        taken |= {guess} if guess else set()
    label = TABLE_LAYOUTS[layout_name].columns["label"]
    if "label" not in mapping and label not in header:
        guess = guess_column("label", header, taken)
        if guess:
            mapping["label"] = guess
    what = ", ".join(f"field {role!r} (column{'s' if len(absent) > 1 else ''} "
                     f"{', '.join(repr(c) for c in absent)})" for role, absent in missing)
    suggestion = ",".join(f"{r}={c}" for r, c in mapping.items())
    return (f"{name}: line 1: {what}: not in the file (layout {layout_name}; its columns: "
            f"{', '.join(header) or 'none'}); try --columns {suggestion}")


def read_header(path: Path) -> list[str] | None:
    """The column names of a CSV (its first row) or JSONL table (every object's keys); None when the file
    cannot be read as such here (featurize's own reader then says exactly why)."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            columns: dict[str, None] = {}
            with open(path, encoding="utf-8-sig") as f:
                for raw in f:
                    if raw.strip():
                        obj = json.loads(raw)
                        if not isinstance(obj, dict):
                            return None
                        columns.update(dict.fromkeys(obj))
            return list(columns)
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [h.strip() for h in next(csv.reader(f))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, StopIteration, RecursionError):
        return None


def check_table_columns(spec: str, layout: str = "auto", columns: dict[str, str] | None = None) -> str | None:
    """The missing_columns message of a table given as 'FILE' or 'FILE:split', from its header alone."""
    name, _ = parse_spec(spec)
    header = read_header(Path(name))
    if header is None:
        return None
    layout_name = detect_layout(header) if layout == "auto" else layout
    if layout_name not in TABLE_LAYOUTS or any(r not in ROLES for r in columns or {}):
        return None                                   # the reader's own message names these
    return missing_columns(name, header, layout_name, columns)


TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson")      # conversation tables: predict featurizes them first


def parse_columns(text: str | None) -> dict[str, str]:
    """'text=transcript,conversation=Season+Episode' -> {'text': 'transcript', ...}"""
    out = {}
    for item in filter(None, (text or "").split(",")):
        role, sep, column = item.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise ValueError(f"--columns {text!r}: expected role=COLUMN,... (e.g. text=transcript)")
        out[role.strip()] = column.strip()
    return out
