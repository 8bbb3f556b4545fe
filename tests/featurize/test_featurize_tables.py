"""Conversation tables -> conversations: layouts, order, speakers, splits, and bad input named by file,
line and field. Standard library only: no optional extra needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmath_mer.data import IGNORE_INDEX, DataError
from cmath_mer.featurize.tables import (
    EMORYNLP_CLASSES,
    label_indices,
    parse_spec,
    read_table,
    read_tables,
    speaker_indices,
)
from cmath_mer.model.config import PRESETS

from helpers import write_csv

MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]
EMORY_HEADER = ["Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode", "Start_Time",
                "End_Time"]


def meld_csv(path: Path) -> Path:
    rows = [  # dialogue 3 first, then 1; dialogue 3's rows out of order; the MELD quote character ’
        [1, "You must’ve had your hands full.", "The Interviewer", "neutral", "neutral", 3, 1, 8, 21, "0", "1"],
        [2, "That I did. That I did.", "Chandler", "neutral", "neutral", 3, 0, 8, 21, "0", "1"],
        [3, "So let’s talk a little bit about your duties.", "The Interviewer", "neutral", "neutral", 3, 2, 8, 21,
         "0", "1"],
        [4, "Oh my God!", "Monica", "surprise", "positive", 1, 0, 2, 3, "0", "1"],
        [5, "What, what?", "Joey", "fear", "negative", 1, 1, 2, 3, "0", "1"],
        [6, "Get out!", "Monica", "anger", "negative", 1, 2, 2, 3, "0", "1"],
    ]
    return write_csv(path, MELD_HEADER, rows)


def emory_csv(path: Path) -> Path:
    rows = [
        ["Hi!", "['Monica Geller']", "Joyful", 0, 0, 1, 1, "", ""],
        ["Hey.", "['Rachel Green', 'Monica Geller']", "Neutral", 0, 1, 1, 1, "", ""],
        ["Come in.", "['Monica Geller']", "Peaceful", 0, 2, 1, 1, "", ""],
        ["Whoa.", "['Joey Tribbiani']", "Scared", 1, 0, 1, 1, "", ""],       # scene 1 of the same episode
        ["Go.", "['Ross Geller']", "Mad", 0, 0, 1, 2, "", ""],               # scene 0 of another episode
    ]
    return write_csv(path, EMORY_HEADER, rows)


def test_meld_layout_is_read_as_it_is(tmp_path):
    corpus = read_tables([f"{meld_csv(tmp_path / 'train_sent_emo.csv')}:test"])
    assert corpus.tables[0].layout == "meld"
    assert corpus.class_names == PRESETS["meld"]["class_names"]
    assert [c[0].conversation for c in corpus.conversations] == ["3", "1"]      # order of first appearance
    assert [u.text for u in corpus.conversations[0]] == ["That I did. That I did.", "You must’ve had your hands full.",
                                                         "So let’s talk a little bit about your duties."]
    assert [u.line for u in corpus.conversations[0]] == [3, 2, 4]
    assert {u.split for u in corpus.utterances} == {"test"}
    assert label_indices(corpus)[3:] == [1, 2, 6]          # surprise, fear, anger in the preset order
    idx, names = speaker_indices(corpus.conversations[0])
    assert idx == [0, 1, 1] and names == ["Chandler", "The Interviewer"]


def test_emorynlp_layout_conversation_is_season_episode_scene(tmp_path):
    corpus = read_tables([str(emory_csv(tmp_path / "emorynlp_dev_final.csv"))], split="valid")
    assert corpus.tables[0].layout == "emorynlp"
    assert corpus.class_names == EMORYNLP_CLASSES
    assert [len(c) for c in corpus.conversations] == [3, 1, 1]
    assert [c[0].conversation for c in corpus.conversations] == ["1/1/0", "1/1/1", "1/2/0"]
    assert [u.speaker for u in corpus.conversations[0]] == ["Monica Geller", "Rachel Green & Monica Geller",
                                                            "Monica Geller"]
    assert {u.split for u in corpus.utterances} == {"valid"}


def test_several_tables_keep_conversation_ids_unique(tmp_path):
    a = meld_csv(tmp_path / "train_sent_emo.csv")
    b = meld_csv(tmp_path / "dev_sent_emo.csv")
    # the same ids, other conversations (the same conversation in two splits is refused)
    b.write_text(b.read_text(encoding="utf-8").replace("That I did.", "This I did.").replace("Get out!", "Get in!"),
                 encoding="utf-8")
    corpus = read_tables([f"{a}:train", f"{b}:dev"])
    ids = [c[0].conversation for c in corpus.conversations]
    assert ids == ["train_sent_emo/3", "train_sent_emo/1", "dev_sent_emo/3", "dev_sent_emo/1"]
    assert [c[0].split for c in corpus.conversations] == ["train", "train", "valid", "valid"]
    assert corpus.conversations[2][0].source_conversation == "3"
    assert [u.position for u in corpus.tables[1].utterances] == list(range(6))


def test_generic_jsonl_with_split_column_and_column_mapping(tmp_path):
    path = tmp_path / "talk.jsonl"
    rows = [{"dlg": "x", "turn": 2, "who": "A", "says": "third", "emo": "happy", "part": "test"},
            {"dlg": "x", "turn": 0, "who": "B", "says": "first", "emo": "sad", "part": "test"},
            {"dlg": "y", "turn": 0, "who": ["A", "C"], "says": "alone", "part": "train"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    cols = {"conversation": "dlg", "utterance": "turn", "speaker": "who", "text": "says", "label": "emo",
            "split": "part"}
    corpus = read_tables([str(path)], columns=cols)
    assert [[u.text for u in c] for c in corpus.conversations] == [["first", "third"], ["alone"]]
    assert corpus.class_names == ("happy", "sad")                    # sorted labels seen
    assert label_indices(corpus) == [1, 0, IGNORE_INDEX]             # no label: ignored, not dropped
    assert [c[0].split for c in corpus.conversations] == ["test", "train"]
    assert corpus.conversations[1][0].speaker == "A & C"


def test_spec_split_suffix():
    assert parse_spec("a.csv:train") == ("a.csv", "train")
    assert parse_spec("a.csv:dev") == ("a.csv", "valid")
    assert parse_spec("C:/x/a.csv") == ("C:/x/a.csv", None)


def _error(tmp_path, name, header, rows, **kw) -> str:
    path = write_csv(tmp_path / name, header, rows)
    with pytest.raises(DataError) as err:
        read_tables([str(path)], **kw)
    return str(err.value)


GENERIC = ["conversation_id", "utterance_id", "speaker", "text", "label"]


def test_missing_column_names_file_field_and_the_mapping_option(tmp_path):
    msg = _error(tmp_path, "t.csv", ["conversation_id", "utterance_id", "speaker", "label"], [["a", 0, "A", "x"]])
    assert "t.csv: line 1: field 'text'" in msg and "--columns text=NAME" in msg


def test_empty_text_names_line_and_field(tmp_path):
    msg = _error(tmp_path, "t.csv", GENERIC, [["a", 0, "A", "hi", "x"], ["a", 1, "B", "  ", "x"]])
    assert "t.csv: line 3: field 'text'" in msg and "empty" in msg


def test_duplicate_utterance_order_names_both_lines(tmp_path):
    msg = _error(tmp_path, "t.csv", GENERIC, [["a", 0, "A", "hi", "x"], ["a", 0, "B", "yo", "x"]])
    assert "t.csv: line 3: field 'utterance'" in msg and "line 2" in msg


def test_non_numeric_utterance_order(tmp_path):
    msg = _error(tmp_path, "t.csv", GENERIC, [["a", "first", "A", "hi", "x"]])
    assert "t.csv: line 2: field 'utterance'" in msg and "'first'" in msg


def test_label_not_in_class_list(tmp_path):
    msg = _error(tmp_path, "m.csv", MELD_HEADER, [[1, "hi", "A", "happy", "x", 0, 0, 1, 1, "", ""]])
    assert "m.csv: line 2: field 'label': 'happy' is not one of the classes neutral" in msg
    msg = _error(tmp_path, "t.csv", GENERIC, [["a", 0, "A", "hi", "z"]], class_names=("x", "y"))
    assert "t.csv: line 2: field 'label': 'z'" in msg


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("conversation_id,utterance_id,speaker,text\na,0,A,hi\na,1,B,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: line 3: not UTF-8"):
        read_tables([str(path)], class_names=("x",))


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffconversation_id,utterance_id,speaker,text\na,0,A,hi\n".encode("utf-8"))
    assert read_tables([str(path)], class_names=("x",)).utterances[0].text == "hi"


def test_media_path_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    header = GENERIC + ["audio"]
    msg = _error(tmp_path / "data", "t.csv", header, [["a", 0, "A", "hi", "x", "../secret.wav"]])
    assert "t.csv: line 2: field 'audio'" in msg and "outside the folder" in msg
    msg = _error(tmp_path / "data", "u.csv", header, [["a", 0, "A", "hi", "x", "/etc/passwd"]])
    assert "outside the folder" in msg


def test_ragged_row_and_conversation_in_two_splits(tmp_path):
    msg = _error(tmp_path, "t.csv", GENERIC, [["a", 0, "A", "hi"]])
    assert "t.csv: line 2: 4 cells for 5 columns" in msg
    msg = _error(tmp_path, "s.csv", GENERIC + ["split"], [["a", 0, "A", "hi", "x", "train"],
                                                         ["a", 1, "A", "yo", "x", "test"]])
    assert "s.csv: line 3: field 'split'" in msg


def test_unlabelled_generic_table_needs_class_names(tmp_path):
    msg = _error(tmp_path, "t.csv", GENERIC[:4], [["a", 0, "A", "hi"]])
    assert "--class-names" in msg
    path = tmp_path / "t.csv"
    assert label_indices(read_tables([str(path)], class_names=("x", "y"))) == [IGNORE_INDEX]


def test_multiline_cell_keeps_line_numbers(tmp_path):
    path = write_csv(tmp_path / "t.csv", GENERIC, [["a", 0, "A", "two\nlines", "x"], ["a", 1, "B", "", "x"]])
    with pytest.raises(DataError, match="line 4: field 'text'"):
        read_table(str(path))


MELD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "meld"


@pytest.mark.skipif(not (MELD_DIR / "dev_sent_emo.csv").exists(), reason="MELD CSVs not in ../shared")
def test_real_meld_dev_table_reads_as_it_is():
    corpus = read_tables([f"{MELD_DIR / 'dev_sent_emo.csv'}:test"])
    assert len(corpus.utterances) == 1109 and len(corpus.conversations) == 114
    assert max(len(speaker_indices(c)[1]) for c in corpus.conversations) <= 9
