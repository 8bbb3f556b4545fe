"""The CSV that `cmath-mer predict` writes: one row per utterance, in the input's order, with the ids and text
the input keeps (a table's own, a featurized file's transcript, else positions), the label, the prediction
and each class's probability."""
from __future__ import annotations

import csv
from pathlib import Path

from cmath_mer.files import atomic_write

# the columns before the probabilities: of a table, of a featurized file with its transcript, of any other file
TABLE_COLUMNS = ["conversation", "utterance", "speaker", "text", "label", "prediction"]
TRANSCRIPT_COLUMNS = ["conversation", "split", "utterance", "speaker", "text", "label", "prediction"]
PLAIN_COLUMNS = ["conversation", "split", "utterance", "speaker", "label", "prediction"]


def _speaker(data, conv: int, row: int):
    speaker = int(data.speakers[row])
    speaker_map = data.metadata.get("speaker_map")
    if speaker_map is not None:
        return speaker_map[conv][speaker]
    if data.speaker_names is not None:
        return data.speaker_names[speaker]
    return speaker


def prediction_rows(data, names, y, p, prob, corpus=None) -> tuple[list[str], list[list]]:
    """(header, rows in the input's order) for the labels `y`, predictions `p` and probabilities `prob` of
    every utterance of `data`; `corpus` is the table `data` was featurized from, if it was."""
    bounds = data.cu_seqlens.tolist()
    transcript = data.metadata.get("transcript")
    rows = []                                      # (position in the input, cells)
    for conv, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        for row in range(start, end):
            speaker = _speaker(data, conv, row)
            label = names[y[row]] if y[row] >= 0 else ""
            probs = [f"{x:.4f}" for x in prob[row]]
            if corpus is not None:                 # a table: its own ids and text, in its row order
                u = corpus.utterances[row]
                rows.append((u.position, [u.source_conversation, u.utterance_id, speaker, u.text, label,
                                          names[p[row]], *probs]))
            elif transcript is not None:           # a featurized file: the ids and text it keeps
                rows.append((row, [data.conversation_ids[conv], data.splits[conv], transcript["utterance_ids"][row],
                                   speaker, transcript["texts"][row], label, names[p[row]], *probs]))
            else:
                rows.append((row, [data.conversation_ids[conv], data.splits[conv], row - start, speaker, label,
                                   names[p[row]], *probs]))
    header = TABLE_COLUMNS if corpus is not None else TRANSCRIPT_COLUMNS if transcript is not None else PLAIN_COLUMNS
    return [*header, *[f"p_{n}" for n in names]], [cells for _, cells in sorted(rows, key=lambda r: r[0])]


def write_predictions(out: Path, header: list[str], rows: list[list]) -> None:
    """The CSV, written atomically: the input is never open for writing, even on a crash."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    atomic_write(out, write)
