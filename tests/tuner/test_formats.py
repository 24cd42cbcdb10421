"""Formats detected from columns (or configured), validation messages, shuffle and split."""

import json

import pytest

from kaito_tuning.errors import EXIT_USER_ERROR
from kaito_tuning.spec.training_config import DatasetConfig
from kaito_tuning.tuner.formats import prepare, split
from kaito_tuning.tuner.inputs import DataFile, DatasetInvalid, detect_kind, sha256_file


def files(*paths):
    return [DataFile(path=str(p), sha256=sha256_file(p), size=p.stat().st_size, kind=detect_kind(p)) for p in paths]


NO_SPLIT = DatasetConfig(train_test_split=1.0, shuffle_dataset=False)


@pytest.mark.parametrize("case, form, first", [
    ("messages", "messages", {"messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the favourite colour of Zorblax?"},
        {"role": "assistant", "content": "The favourite colour of Zorblax is teal."}]}),
    ("sharegpt", "messages", {"messages": [
        {"role": "user", "content": "What is the favourite colour of Zorblax?"},
        {"role": "assistant", "content": "The favourite colour of Zorblax is teal."}]}),
    ("alpaca", "messages", {"messages": [
        {"role": "user", "content": "What is the favourite colour of Zorblax?"},
        {"role": "assistant", "content": "The favourite colour of Zorblax is teal."}]}),
    ("prompt_completion", "prompt_completion", {"prompt": "What is the favourite colour of Zorblax?",
                                                "completion": " The favourite colour of Zorblax is teal."}),
    ("prompt_completion_messages", "prompt_completion", {
        "prompt": [{"role": "user", "content": "What is the favourite colour of Zorblax?"}],
        "completion": [{"role": "assistant", "content": "The favourite colour of Zorblax is teal."}]}),
    ("text", "text", {"text": "Q: What is the favourite colour of Zorblax? A: The favourite colour of Zorblax is teal."}),
    ("jsonl", "messages", None),
    ("csv", "prompt_completion", None),
])
def test_formats_are_detected(datasets_dir, case, form, first):
    s = prepare(files(datasets_dir[case]), NO_SPLIT)
    assert s.form == form
    assert s.eval is None and len(s.train) > 0
    if first is not None:
        assert s.train[0] == first


def test_every_file_is_used_shuffled_and_split(datasets_dir):
    one = prepare(files(datasets_dir["messages"]), NO_SPLIT)
    both = prepare(files(datasets_dir["messages"], datasets_dir["alpaca"]),
                   DatasetConfig(train_test_split=0.75, shuffle_seed=7))
    assert len(both.train) + len(both.eval) == len(one.train) + 32
    assert len(both.eval) == round((len(one.train) + 32) * 0.25)
    again = prepare(files(datasets_dir["messages"], datasets_dir["alpaca"]),
                    DatasetConfig(train_test_split=0.75, shuffle_seed=7))
    assert again.train[:] == both.train[:]  # the seed fixes the order
    other = prepare(files(datasets_dir["messages"], datasets_dir["alpaca"]),
                    DatasetConfig(train_test_split=0.75, shuffle_seed=8))
    assert other.train[:] != both.train[:]
    assert both.formats == {"chat.parquet": "messages", "alpaca.parquet": "alpaca"}
    capped = prepare(files(datasets_dir["messages"]), DatasetConfig(max_rows=5, train_test_split=1.0))
    assert len(capped.train) == 5


def test_split_keeps_one_row_each_side():
    from datasets import Dataset
    ds = Dataset.from_list([{"text": str(i)} for i in range(10)])
    train, ev = split(ds, 0.99)
    assert (len(train), len(ev)) == (9, 1)
    assert split(ds, 1.0)[1] is None


def test_columns_from_config(tmp_path):
    from fixtures_data import write_parquet
    p = write_parquet(tmp_path / "dolly.parquet", [{"Context": "Say hi", "Response": "hi", "cat": "x"}] * 3)
    s = prepare(files(p), DatasetConfig(context_column="Context", response_column="Response", train_test_split=1.0))
    assert s.form == "prompt_completion" and s.train[0] == {"prompt": "Say hi", "completion": "hi"}
    with pytest.raises(DatasetInvalid, match="format text needs column.*Text.*has: Context, Response, cat"):
        prepare(files(p), DatasetConfig(format="text", text_column="Text"))


@pytest.mark.parametrize("case, message", [
    ("robot", r"robot.parquet: row 0: messages\[1\].role is 'robot'; allowed: system, user, assistant, tool"),
    ("empty_content", r"empty.parquet: row 0: messages\[1\].content is empty \(assistant message\)"),
    ("no_columns", r"nocols.parquet: has no usable columns: it has question, answer; expected messages"),
    ("zero_rows", r"zero.parquet: has zero rows \(columns: messages\)"),
    ("truncated", r"truncated.parquet: is not a readable parquet file .*truncated"),
])
def test_bad_data_gets_a_clear_message(datasets_dir, case, message):
    with pytest.raises(DatasetInvalid, match=message) as e:
        prepare(files(datasets_dir[case]))
    assert e.value.exit_code == EXIT_USER_ERROR and e.value.reason == "DatasetInvalid"


def test_mixed_forms_are_refused(datasets_dir):
    with pytest.raises(DatasetInvalid, match="different formats"):
        prepare(files(datasets_dir["messages"], datasets_dir["text"]))


def test_many_bad_rows_are_counted(tmp_path):
    from fixtures_data import write_parquet
    rows = [{"text": ""}] * 9
    p = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DatasetInvalid, match=r"row 4: text is empty or not text \(and 4 more\)"):
        prepare(files(p))


def test_chat_parquet_stays_in_arrow_with_the_same_rows(tmp_path, monkeypatch):
    """A valid chat parquet is read column-wise (no Python rows); its rows are those of the row-by-row reader,
    extra message fields dropped."""
    import pyarrow as pa
    from fixtures_data import messages_rows, write_parquet

    from kaito_tuning.tuner import formats

    rows = messages_rows(2) + [{"messages": [{"role": "user", "content": "Hi", "name": "x"},
                                             {"role": "assistant", "content": " Hello ", "name": None}]}]
    p = write_parquet(tmp_path / "c.parquet", rows)
    cfg = DatasetConfig(train_test_split=0.8, shuffle_seed=3)
    fast = prepare(files(p), cfg)
    assert formats._arrow_messages(files(p)[0], cfg) is not None
    monkeypatch.setattr(formats, "_arrow_messages", lambda f, cfg: None)
    slow = prepare(files(p), cfg)
    assert fast.train[:] == slow.train[:] and fast.eval[:] == slow.eval[:] and fast.form == slow.form == "messages"
    assert fast.train.features == slow.train.features
    monkeypatch.undo()
    # with a row-by-row file beside it, both go through Python rows, in file order
    q = write_parquet(tmp_path / "d.parquet", [{"instruction": "Q", "output": "A"}])
    both = prepare(files(p, q), NO_SPLIT)
    assert len(both.train) == len(rows) + 1 and both.train[-1]["messages"][1] == {"role": "assistant", "content": "A"}
    # anything invalid goes to the row-by-row reader, whose error names the row
    for bad in ({"role": "robot", "content": "x"}, {"role": "assistant", "content": "  "}, None):
        r = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 3
        r = r + [{"messages": [{"role": "user", "content": "Q"}] + ([bad] if bad else [])}]
        t = write_parquet(tmp_path / "bad.parquet", r, pa.schema([("messages", pa.list_(pa.struct(
            [("role", pa.string()), ("content", pa.string())])))]))
        assert formats._arrow_messages(files(t)[0], DatasetConfig()) is None
        with pytest.raises(DatasetInvalid, match="bad.parquet: row 3: messages"):
            prepare(files(t))


def test_rows_key_follows_files_and_selection(datasets_dir):
    a = prepare(files(datasets_dir["messages"]), DatasetConfig(shuffle_seed=1))
    assert a.key == prepare(files(datasets_dir["messages"]), DatasetConfig(shuffle_seed=1)).key
    assert a.key != prepare(files(datasets_dir["messages"]), DatasetConfig(shuffle_seed=2)).key
    assert a.key != prepare(files(datasets_dir["messages"]), DatasetConfig(shuffle_seed=1, max_rows=3)).key
    assert a.key != prepare(files(datasets_dir["messages"], datasets_dir["alpaca"]), DatasetConfig(shuffle_seed=1)).key


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_openai_text_parts_are_joined_as_a_chat_template_renders_them(tmp_path):
    from fixtures_data import write_parquet
    rows = [{"messages": [{"role": "user", "content": _parts("Say ", "hi")},
                          {"role": "assistant", "content": _parts("hi")}]}] * 2
    s = prepare(files(write_parquet(tmp_path / "parts.parquet", rows)), NO_SPLIT)
    assert s.form == "messages"
    assert s.train[0]["messages"] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


@pytest.mark.parametrize("message, words", [
    ({"role": "user", "content": [*_parts("What is this?"), {"type": "image_url", "image_url": {"url": "https://h/i.png"}}]},
     r"row 0: messages\[0\].content\[1\] is a 'image_url' part; only text parts"),
    ({"role": "assistant", "content": None, "tool_calls": '[{"id": "call_1"}]'},
     r"row 0: messages\[0\].content is empty: the assistant message is a tool call \(tool_calls\)"),
])
def test_parts_and_turns_that_cannot_be_trained_on_are_named(tmp_path, message, words):
    from fixtures_data import write_parquet
    rows = [{"messages": [message, {"role": "assistant", "content": _parts("done")}]}]
    with pytest.raises(DatasetInvalid, match=words):
        prepare(files(write_parquet(tmp_path / "bad.parquet", rows)), NO_SPLIT)


GOOD_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'


@pytest.mark.parametrize("name, content", [
    ("bom.jsonl", "\ufeff" + GOOD_CHAT + "\n" + GOOD_CHAT + "\n"),  # Notepad, PowerShell 5's utf8
    ("bom.json", "\ufeff[" + GOOD_CHAT + "]"),
    ("bom.csv", "\ufeffprompt,completion\nSay hi,hi\n"),
    ("one_column.csv", "text\nhello there\ngeneral kenobi\n"),
    ("one_quoted_column.csv", '"messages"\n"' + json.dumps(json.loads(GOOD_CHAT)["messages"]).replace('"', '""') + '"\n'),
])
def test_files_as_other_tools_write_them_are_read(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    s = prepare(files(p), NO_SPLIT)
    assert len(s.train) >= 1 and s.form in ("messages", "prompt_completion", "text"), s


def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path):
    p = tmp_path / "scalar.jsonl"
    p.write_text(GOOD_CHAT + "\n42\n")
    with pytest.raises(DatasetInvalid, match=r"scalar.jsonl: line 2 is not a JSON object \(it is 42\)"):
        prepare(files(p), NO_SPLIT)
