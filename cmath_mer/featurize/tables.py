"""Conversation tables (CSV or JSONL, one row per utterance) -> validated, ordered conversations.

A table names, per utterance, its conversation, its order in it, the speaker and the text; optionally the
label, the split, an audio file and a visual `.npy` vector (paths relative to the table's folder). Three
layouts are known and detected from the header:

    meld      Dialogue_ID, Utterance_ID, Speaker, Utterance, Emotion (the MELD CSVs as they are)
    emorynlp  Season, Episode, Scene_ID, Utterance_ID, Speaker (a list written as text), Utterance, Emotion
    generic   conversation_id, utterance_id, speaker, text, label, split, audio, visual

`columns` renames any role for another layout ({"text": "transcript"}; several columns joined make a
conversation id: {"conversation": "Season+Episode+Scene_ID"}). Every error is a DataError naming the file,
the line and the field; nothing is dropped silently.
"""
from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data import IGNORE_INDEX, SPLITS, DataError
from ..table_layouts import (  # noqa: F401
    EMORYNLP_CLASSES,
    REQUIRED,
    ROLES,
    SPLIT_NAMES,
    TABLE_LAYOUTS,
    detect_layout,
    missing_columns,
    parse_spec,
)


@dataclass
class Utterance:
    file: str                 # the table, as given
    line: int                 # where the row starts in it (the header is line 1 of a CSV)
    position: int             # index of the row among all rows read (input order)
    conversation: str         # unique across the tables read together
    order: int
    speaker: str
    text: str
    label: str | None         # None: unlabelled
    split: str
    audio: Path | None = None
    visual: Path | None = None
    utterance_id: str = ""    # the order cell as written
    source_conversation: str = ""   # the conversation cell(s) as written


@dataclass
class Table:
    path: Path
    name: str                 # as given on the command line
    layout: str
    split: str | None         # given with the file (FILE:split) or by --split
    sha256: str
    utterances: list[Utterance] = field(default_factory=list)
    has: set[str] = field(default_factory=set)   # optional roles the table has a column for


def _decode(path: Path, name: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except OSError as err:
        raise DataError(f"{name}: cannot read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")          # -sig: a BOM (Excel's CSV export) is not part of a column name
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{name}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start}); save the file as UTF-8") from None


def _read_rows(path: Path, name: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line, {column: cell})]) of a CSV or JSONL file (JSONL: a .jsonl/.ndjson suffix)."""
    text = _decode(path, name)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        columns: dict[str, None] = {}
        rows = []
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}: line {line}: not a JSON object ({err.msg})") from None
            except RecursionError:
                raise DataError(f"{name}: line {line}: the JSON is nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{name}: line {line}: a JSON {type(obj).__name__}, expected an object")
            columns.update(dict.fromkeys(obj))
            rows.append((line, obj))
        return list(columns), rows
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{name}: line 1: empty file, expected a header row") from None
    header = [h.strip() for h in header]
    rows, line = [], reader.line_num + 1
    try:
        for cells in reader:
            if cells:                                    # a blank line is no row
                if len(cells) != len(header):
                    raise DataError(f"{name}: line {line}: {len(cells)} cells for {len(header)} columns")
                rows.append((line, dict(zip(header, cells))))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{name}: line {line}: unreadable CSV ({err})") from None
    return header, rows


def _check_values(row: dict, cols: dict[str, str], has: set[str], name: str, line: int) -> None:
    """A JSONL value is a string or a number (the speaker also a list of names): an object or a list is
    refused, never written as its Python text."""
    for role in (*REQUIRED, *has):
        for column in cols[role].split("+"):
            value = row.get(column)
            names = role == "speaker" and isinstance(value, list) and value and all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
            if isinstance(value, (dict, list)) and not names:
                raise DataError(f"{name}: line {line}: field {role!r} (column {column!r}): a JSON "
                                f"{'object' if isinstance(value, dict) else 'list'}, expected a string or a number"
                                + (" (or, for the speaker, a list of names)" if role == "speaker" else ""))


def _check_split_overlap(conversations: list[list[Utterance]]) -> None:
    """The same conversation (its id and every utterance) in two splits, e.g. one table given as :train and
    as :test, would be trained on and tested on: refused."""
    seen: dict[tuple, Utterance] = {}
    for rows in conversations:
        first = rows[0]
        key = (first.source_conversation, tuple((u.utterance_id, u.speaker, u.text) for u in rows))
        other = seen.setdefault(key, first)
        if other.split != first.split:
            raise DataError(f"{first.file}: line {first.line}: field 'conversation': conversation "
                            f"{first.source_conversation!r} ({first.split}) is also in {other.file} line "
                            f"{other.line} ({other.split}), utterance for utterance; a conversation belongs to one "
                            f"split")


def _cell(row: dict, column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, list):                       # JSONL: a list of speakers
        return " & ".join(str(v) for v in value)
    return str(value).strip()


def _speaker(cell: str) -> str:
    """EmoryNLP writes the speaker as a list, "['Monica Geller']"; several people speaking together become
    one speaker "A & B"."""
    if cell.startswith("[") and cell.endswith("]"):
        try:
            names = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            return cell
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return " & ".join(n.strip() for n in names)
    return cell


def _media(cell: str, root: Path, name: str, line: int, role: str) -> Path | None:
    """The file a media cell names, relative to `root` (the table's folder unless given); a path that
    leaves `root` is refused, so a table cannot make the tool read arbitrary files."""
    if not cell:
        return None
    resolved = (root / cell).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"{name}: line {line}: field {role!r}: {cell!r} is outside the folder {str(root)!r}; "
                        f"paths must stay inside it (give --media-root for another folder)")
    return resolved


def read_table(spec: str, *, layout: str = "auto", columns: dict[str, str] | None = None,
               split: str | None = None, media_root: str | Path | None = None) -> Table:
    """Read one table. spec: 'PATH' or 'PATH:split'. split: the split of rows with no split column (an
    explicit ':split' wins over both). Conversation ids are the table's own (read_tables makes them unique)."""
    name, spec_split = parse_spec(spec)
    if split is not None and split not in SPLIT_NAMES:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
    path = Path(name)
    header, rows = _read_rows(path, name)
    layout_name = detect_layout(header) if layout == "auto" else layout
    if layout_name not in TABLE_LAYOUTS:
        raise DataError(f"{name}: unknown layout {layout!r}; choose one of auto, {', '.join(TABLE_LAYOUTS)}")
    cols = {**TABLE_LAYOUTS[layout_name].columns, **(columns or {})}
    unknown = [r for r in (columns or {}) if r not in ROLES]
    if unknown:
        raise DataError(f"{name}: unknown column role {unknown[0]!r}; roles are {', '.join(ROLES)}")

    def present(role):
        return all(c in header for c in cols[role].split("+"))
    missing = missing_columns(name, header, layout_name, columns)
    if missing:
        raise DataError(missing)
    table = Table(path, name, layout_name, spec_split or (SPLIT_NAMES[split] if split else None),
                  hashlib.sha256(path.read_bytes()).hexdigest(),
                  has={r for r in ("label", "split", "audio", "visual") if present(r)})
    root = Path(media_root) if media_root is not None else path.parent

    for position, (line, row) in enumerate(rows):
        _check_values(row, cols, table.has, name, line)

        def cell(role):
            return "/".join(_cell(row, c) for c in cols[role].split("+")) if role in table.has or \
                role in REQUIRED else ""
        conv, order_cell, speaker, text = cell("conversation"), cell("utterance"), cell("speaker"), cell("text")
        for role, value in (("conversation", conv), ("utterance", order_cell), ("speaker", speaker),
                            ("text", text)):
            if not all(_cell(row, c) for c in cols[role].split("+")):
                raise DataError(f"{name}: line {line}: field {role!r} (column {cols[role]!r}) is empty")
        try:
            order = int(float(order_cell)) if float(order_cell).is_integer() else None
        except ValueError:
            order = None
        if order is None:
            raise DataError(f"{name}: line {line}: field 'utterance' (column {cols['utterance']!r}): "
                            f"{order_cell!r} is not a whole number (the utterance's order in its conversation)")
        row_split = table.split
        if row_split is None and "split" in table.has and cell("split"):
            s = cell("split").lower()
            if s not in SPLIT_NAMES:
                raise DataError(f"{name}: line {line}: field 'split' (column {cols['split']!r}): {cell('split')!r} "
                                f"is not one of {', '.join(SPLITS)}")
            row_split = SPLIT_NAMES[s]
        table.utterances.append(Utterance(
            file=name, line=line, position=position, conversation=conv, order=order,
            speaker=_speaker(speaker), text=text, label=cell("label") or None, split=row_split or "train",
            audio=_media(cell("audio"), root, name, line, "audio") if "audio" in table.has else None,
            visual=_media(cell("visual"), root, name, line, "visual") if "visual" in table.has else None,
            utterance_id=order_cell, source_conversation=conv))
    if not table.utterances:
        raise DataError(f"{name}: no rows after the header")
    return table


@dataclass
class Corpus:
    tables: list[Table]
    conversations: list[list[Utterance]]     # in order of first appearance per table, rows by utterance order
    class_names: tuple[str, ...]

    @property
    def utterances(self) -> list[Utterance]:
        return [u for conv in self.conversations for u in conv]


def read_tables(specs: list[str], *, class_names: tuple[str, ...] | None = None, **options) -> Corpus:
    """Read every table (options of read_table), group rows into conversations, check orders, splits and
    labels. With several tables a conversation id is prefixed by its table's file stem ('train/0'), so ids
    stay unique. class_names: given, else the layout's (MELD, EmoryNLP), else the sorted labels seen."""
    if not specs:
        raise DataError("no conversation table given")
    tables = [read_table(s, **options) for s in specs]
    prefixes: list[str] = []
    for t in tables:
        stem = t.path.stem
        prefixes.append(stem if stem not in prefixes else f"{stem}#{len(prefixes)}")
    conversations: list[list[Utterance]] = []
    for t, prefix in zip(tables, prefixes):
        groups: dict[str, list[Utterance]] = {}
        for u in t.utterances:
            if len(tables) > 1:
                u.conversation = f"{prefix}/{u.conversation}"
            groups.setdefault(u.conversation, []).append(u)
        for cid, rows in groups.items():
            seen: dict[int, Utterance] = {}
            for u in rows:
                if u.order in seen:
                    raise DataError(f"{t.name}: line {u.line}: field 'utterance': conversation "
                                    f"{u.source_conversation!r} already has utterance {u.utterance_id!r} "
                                    f"(line {seen[u.order].line}); the order must be unique in a conversation")
                seen[u.order] = u
                if u.split != rows[0].split:
                    raise DataError(f"{t.name}: line {u.line}: field 'split': conversation "
                                    f"{u.source_conversation!r} is in split {rows[0].split!r} at line "
                                    f"{rows[0].line} and {u.split!r} here")
            conversations.append(sorted(rows, key=lambda u: u.order))
    _check_split_overlap(conversations)

    if class_names is None:
        known = {TABLE_LAYOUTS[t.layout].class_names for t in tables if TABLE_LAYOUTS[t.layout].class_names}
        if len(known) > 1:
            raise DataError(f"{', '.join(t.name for t in tables)}: tables of different layouts "
                            f"({', '.join(t.layout for t in tables)}) have different classes; give --class-names")
        if known:
            class_names = known.pop()
        else:
            seen_labels = sorted({u.label for conv in conversations for u in conv if u.label is not None})
            if not seen_labels:
                raise DataError(f"{', '.join(t.name for t in tables)}: field 'label': no labels and no class "
                                f"names; give --class-names a,b,c (the model's classes)")
            class_names = tuple(seen_labels)
    corpus = Corpus(tables, conversations, tuple(class_names))
    label_indices(corpus)                          # an unknown label stops here, before any encoding
    return corpus


def label_indices(corpus: Corpus) -> list[int]:
    """Class index of every utterance (packed order), IGNORE_INDEX where unlabelled."""
    index = {n: i for i, n in enumerate(corpus.class_names)}
    out = []
    for u in corpus.utterances:
        if u.label is None:
            out.append(IGNORE_INDEX)
        elif u.label in index:
            out.append(index[u.label])
        else:
            raise DataError(f"{u.file}: line {u.line}: field 'label': {u.label!r} is not one of the classes "
                            f"{', '.join(corpus.class_names)}; give --class-names for other classes")
    return out


def speaker_indices(conversation: list[Utterance]) -> tuple[list[int], list[str]]:
    """Speaker index of each utterance, numbered per conversation in order of appearance (what the peers'
    one-hot speaker vectors encode), and the names of indices 0, 1, ..."""
    names: dict[str, int] = {}
    return [names.setdefault(u.speaker, len(names)) for u in conversation], list(names)
