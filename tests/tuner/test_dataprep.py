"""dataprep: row for row what TRL's own SFTTrainer preparation makes (input_ids, labels, seq_lengths),
for every form and loss mask, truncated and packed; the cache; what is left to TRL."""

import pytest
from fixtures_data import messages_rows, write_parquet

from kaito_tuning.spec.training_config import DatasetConfig
from kaito_tuning.tuner import dataprep, encoding
from kaito_tuning.tuner.formats import prepare
from kaito_tuning.tuner.inputs import collect_dir

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

#: texts that stress token boundaries: leading/trailing whitespace and newlines, unicode, digits, code
AWKWARD = ["\nStarts with a newline.", " starts with a space", "ends with spaces   ", "Ünïcödé — ok? 12345",
           "def f(x):\n    return x  # code", "\n\n\nthree newlines", "<|end|> looks special", "a" * 120,
           "mixed\r\nline\tendings", " \n spaced ", "😀 emoji first"]


def awkward_messages() -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": AWKWARD[i]},
                          {"role": "assistant", "content": AWKWARD[(i + 3) % len(AWKWARD)]}]}
            for i in range(len(AWKWARD))]
    rows.append({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"},
                              {"role": "assistant", "content": "\nYes, again."}]})
    # long answers: cut before tokenizing where max_length drops their end (and mended where cut too short)
    long_text = " ".join(f"Sentence {i} says something about rivers, and cities; then more words follow."
                         for i in range(60))
    rows += [{"messages": [{"role": "user", "content": "Tell me a long story."},
                           {"role": "assistant", "content": long_text}]},
             {"messages": [{"role": "user", "content": long_text[:700]},
                           {"role": "assistant", "content": "x" * 900 + " " + long_text}]}]
    return rows + messages_rows(1)


@pytest.fixture(scope="module")
def tok(tiny_phi3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_phi3)


@pytest.fixture(scope="module")
def chatml_tok(tiny_phi3):
    """The tiny tokenizer with ChatML special tokens and a template without generation markers (SmolLM2's kind)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_phi3)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def splits(tmp_path, name, rows, split=1.0):
    d = tmp_path / name
    d.mkdir()
    write_parquet(d / f"{name}.parquet", rows)
    return prepare(collect_dir(d), DatasetConfig(train_test_split=split, shuffle_dataset=False))


def sft_args(tmp_path, **kw):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, **kw)


def trl_prepared(data, tok, args, model_dir):
    """TRL's own preparation: a real SFTTrainer's train/eval datasets."""
    import copy

    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from kaito_tuning.tuner.recipe import choose_loss_mask

    train, eval_, _ = choose_loss_mask(data, tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tok))
    t = SFTTrainer(model=model, args=copy.deepcopy(args), train_dataset=train, eval_dataset=eval_,
                   processing_class=copy.deepcopy(tok))
    return t.train_dataset, t.eval_dataset


def rows(ds, columns=("input_ids", "labels", "seq_lengths")):
    cols = [c for c in columns if c in ds.column_names]
    return [{c: r[c] for c in cols} for r in ds]


def same_as_trl(data, tok, args, model_dir, loss_mask, tmp_path=None):
    from kaito_tuning.tuner.recipe import choose_loss_mask

    assert choose_loss_mask(data, tok)[2] == loss_mask
    ours = dataprep.prepare_for_training(data, tok, args, loss_mask=loss_mask)
    assert ours is not None
    want_train, want_eval = trl_prepared(data, tok, args, model_dir)
    assert set(ours.train.column_names) == {"input_ids", "labels"} | ({"seq_lengths"} if args.packing else set())
    assert rows(ours.train) == rows(want_train)
    assert len(ours.train) > 0 and any(v != -100 for r in rows(ours.train) for v in r["labels"])
    if want_eval is not None:
        assert rows(ours.eval) == rows(want_eval)
    return ours


@pytest.mark.parametrize("kw", [{}, {"max_length": 24}, {"max_length": 24, "truncation_mode": "keep_end"},
                                {"packing": True, "max_length": 64}, {"shuffle_dataset": True, "max_length": 40}])
def test_messages_assistant_only_same_as_trl(tok, tiny_phi3, tmp_path, kw):
    data = splits(tmp_path, "chat", awkward_messages(), split=0.8)
    same_as_trl(data, tok, sft_args(tmp_path, assistant_only_loss=True, **kw), tiny_phi3, "assistant_only")


@pytest.mark.parametrize("kw", [{}, {"max_length": 80}, {"packing": True, "max_length": 64}])
def test_messages_last_turn_as_completion_same_as_trl(chatml_tok, tiny_phi3, tmp_path, kw):
    data = splits(tmp_path, "chat", awkward_messages())
    ours = same_as_trl(data, chatml_tok, sft_args(tmp_path, completion_only_loss=True, **kw), tiny_phi3,
                       "completion_only")
    assert ours.tokens > 0


def test_split_tokenization_matches_whole_texts(chatml_tok):
    """The shared text before the generation prompt's special token is tokenized once: the same tokens."""
    enc = encoding.Encoder(chatml_tok)
    prompts, completions = dataprep._last_turn_split([r["messages"] for r in awkward_messages()])
    p_texts, _ = encoding._render(chatml_tok, prompts, CHATML, add_generation_prompt=True)
    f_texts, _ = encoding._render(chatml_tok, [p + c for p, c in zip(prompts, completions)], CHATML)
    assert p_texts == chatml_tok.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    cands = encoding._split_candidates(enc, CHATML)
    assert cands == ["<|im_start|>", "<|im_end|>"]
    assert all(p[encoding._split_point(p, f, cands):] == "<|im_start|>assistant\n" for p, f in zip(p_texts, f_texts))
    work = encoding.ChatPairsWork(enc, prompts, completions, CHATML, False, "train")
    full, masks = encoding.run_work(work, enc)
    for i, (p, f) in enumerate(zip(p_texts, f_texts)):
        whole = chatml_tok(f, add_special_tokens=False)["input_ids"]
        pids = chatml_tok(p, add_special_tokens=False)["input_ids"]
        assert list(full.row(i)) == whole
        n = next((k for k, (a, b) in enumerate(zip(pids, whole)) if a != b), min(len(pids), len(whole)))
        start = int(full.lengths[:i].sum())
        assert list(masks["completion"][start:start + len(whole)]) == [k >= n for k in range(len(whole))]


def test_a_split_that_changes_tokens_falls_back_to_whole_texts(chatml_tok, tiny_phi3, tmp_path, monkeypatch,
                                                                caplog):
    """The check on the first rows catches a cut that tokenizes differently: every row is then tokenized whole."""
    # a cut inside a word ("hel|pful" of the system prompt): the pieces tokenize differently from the whole word
    monkeypatch.setattr(encoding, "_split_point", lambda p, f, cands: p.find("helpful") + 3 if "helpful" in p else 0)
    data = splits(tmp_path, "chat", awkward_messages())
    with caplog.at_level("INFO", logger="kaito_tuning.tuner"):
        same_as_trl(data, chatml_tok, sft_args(tmp_path, completion_only_loss=True), tiny_phi3, "completion_only")
    assert "tokenizing prompts and completions whole" in caplog.text


def test_chunks_give_the_same_rows(chatml_tok, tok, tmp_path, monkeypatch):
    data = splits(tmp_path, "chat", awkward_messages())
    for t, mask, kw in ((chatml_tok, "completion_only", {"completion_only_loss": True}),
                        (tok, "assistant_only", {"assistant_only_loss": True})):
        monkeypatch.setattr(encoding, "CHUNK", 1024)
        whole = dataprep.prepare_for_training(data, t, sft_args(tmp_path, **kw), loss_mask=mask)
        monkeypatch.setattr(encoding, "CHUNK", 3)
        chunked = dataprep.prepare_for_training(data, t, sft_args(tmp_path, **kw), loss_mask=mask)
        assert rows(chunked.train) == rows(whole.train)


def test_messages_all_tokens_same_as_trl(tok, tiny_phi3, tmp_path):
    data = splits(tmp_path, "chat", awkward_messages())
    ours = dataprep.prepare_for_training(data, tok, sft_args(tmp_path, max_length=32), loss_mask="all_tokens")
    want, _ = trl_prepared_plain(data, tok, sft_args(tmp_path, max_length=32), tiny_phi3)
    assert rows(ours.train) == rows(want)


def trl_prepared_plain(data, tok, args, model_dir):
    """TRL's preparation of the data as it is (no recipe conversion): what a plain SFTTrainer script does."""
    import copy

    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    t = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=copy.deepcopy(args),
                   train_dataset=data.train, processing_class=copy.deepcopy(tok))
    return t.train_dataset, t.eval_dataset


@pytest.mark.parametrize("case, loss_mask", [("prompt_completion", "completion_only"),
                                             ("prompt_completion_messages", "completion_only"),
                                             ("text", "all_tokens")])
@pytest.mark.parametrize("kw", [{}, {"max_length": 32}, {"packing": True, "max_length": 48}])
def test_other_forms_same_as_trl(tok, tiny_phi3, datasets_dir, tmp_path, case, loss_mask, kw):
    d = tmp_path / case
    d.mkdir()
    (d / datasets_dir[case].name).write_bytes(datasets_dir[case].read_bytes())
    data = prepare(collect_dir(d), DatasetConfig(train_test_split=0.75, shuffle_dataset=True))
    completion = {"completion_only_loss": True} if loss_mask == "completion_only" else {}
    same_as_trl(data, tok, sft_args(tmp_path, **completion, **kw), tiny_phi3, loss_mask)


def test_cache_is_reused_and_keyed(tok, tmp_path):
    data = splits(tmp_path, "chat", awkward_messages(), split=0.8)
    args = sft_args(tmp_path, assistant_only_loss=True, max_length=32)
    cache = tmp_path / "out" / ".cache"
    first = dataprep.prepare_for_training(data, tok, args, loss_mask="assistant_only", cache_dir=cache)
    second = dataprep.prepare_for_training(data, tok, args, loss_mask="assistant_only", cache_dir=cache)
    assert not first.cached and second.cached and first.key == second.key
    assert rows(second.train) == rows(first.train) and rows(second.eval) == rows(first.eval)
    assert [p.name for p in cache.iterdir()] == [f"dataprep-{first.key[:24]}"]
    # another max_length, another template or another tokenizer: another key, the old entry replaced
    other = dataprep.prepare_for_training(data, tok, sft_args(tmp_path, assistant_only_loss=True, max_length=16),
                                          loss_mask="assistant_only", cache_dir=cache)
    assert not other.cached and other.key != first.key
    assert [p.name for p in cache.iterdir()] == [f"dataprep-{other.key[:24]}"]
    keys = {dataprep.cache_key(data, tok, args, "assistant_only", t) for t in ("a", "b")}
    assert len(keys) == 2
    # a corrupt entry is ignored and rewritten
    (cache / f"dataprep-{other.key[:24]}" / "meta.json").write_text("{")
    again = dataprep.prepare_for_training(data, tok, sft_args(tmp_path, assistant_only_loss=True, max_length=16),
                                          loss_mask="assistant_only", cache_dir=cache)
    assert not again.cached and rows(again.train) == rows(other.train)


def test_cache_key_follows_the_data(tok, tmp_path):
    args = sft_args(tmp_path, max_length=32)
    a = splits(tmp_path, "a", messages_rows(1))
    b = splits(tmp_path, "b", messages_rows(2))
    key = lambda d: dataprep.cache_key(d, tok, args, "assistant_only", "t")  # noqa: E731
    assert key(a) != key(b) and key(a) == key(splits(tmp_path, "a2", messages_rows(1)))


def test_what_is_left_to_trl(tok, tmp_path):
    data = splits(tmp_path, "chat", messages_rows(1))
    assert dataprep.prepare_for_training(data, tok, sft_args(tmp_path, dataset_text_field="body"),
                                         loss_mask="assistant_only") is None
    assert dataprep.prepare_for_training(
        data, tok, sft_args(tmp_path, dataset_kwargs={"skip_prepare_dataset": True}),
        loss_mask="assistant_only") is None


def test_a_template_marking_no_assistant_tokens_names_the_row(tok, tmp_path):
    from kaito_tuning.tuner.inputs import DatasetInvalid

    t = __import__("copy").deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and false %}"
                       "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                       "<|end|>{% endfor %}")
    data = splits(tmp_path, "chat", messages_rows(1))
    with pytest.raises(DatasetInvalid, match="row 0 has no assistant tokens"):
        dataprep.prepare_for_training(data, t, sft_args(tmp_path, assistant_only_loss=True),
                                      loss_mask="assistant_only")


@pytest.mark.parametrize("chars_per_token", [5, 1])
def test_long_texts_cut_before_tokenizing_give_trls_rows(chatml_tok, tok, tiny_phi3, tmp_path, monkeypatch,
                                                         chars_per_token):
    """Texts whose end max_length drops are cut at a word boundary first; rows cut too short (1 character per
    token) are tokenized whole again. Either way the rows are TRL's."""
    monkeypatch.setattr(encoding, "CUT_CHARS_PER_TOKEN", chars_per_token)
    cut_rows = []
    real_cut = encoding._Cutter.cut

    def spy(self, texts, before=None):
        out, cut = real_cut(self, texts, before)
        cut_rows.append(int(cut.sum()))
        return out, cut

    monkeypatch.setattr(encoding._Cutter, "cut", spy)
    assert encoding.Encoder(chatml_tok).prefix_cut_ok()
    data = splits(tmp_path, "chat", awkward_messages())
    same_as_trl(data, chatml_tok, sft_args(tmp_path, completion_only_loss=True, max_length=80), tiny_phi3,
                "completion_only")
    same_as_trl(data, chatml_tok, sft_args(tmp_path, completion_only_loss=True, max_length=80, packing=True),
                tiny_phi3, "completion_only")
    ours = dataprep.prepare_for_training(data, tok, sft_args(tmp_path, max_length=60), loss_mask="all_tokens")
    want, _ = trl_prepared_plain(data, tok, sft_args(tmp_path, max_length=60), tiny_phi3)
    assert rows(ours.train) == rows(want)
    assert sum(cut_rows) >= 3
    # keep_end needs the end: nothing is cut
    cut_rows.clear()
    same_as_trl(data, chatml_tok, sft_args(tmp_path, completion_only_loss=True, max_length=80,
                                           truncation_mode="keep_end"), tiny_phi3, "completion_only")
    assert sum(cut_rows) == 0


def test_a_cut_that_changes_tokens_falls_back_to_whole_texts(tok, tiny_phi3, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(encoding, "_cut_point", lambda text, limit: limit - 3)  # inside a word
    data = splits(tmp_path, "chat", awkward_messages())
    with caplog.at_level("INFO", logger="kaito_tuning.tuner"):
        ours = dataprep.prepare_for_training(data, tok, sft_args(tmp_path, max_length=60), loss_mask="all_tokens")
    want, _ = trl_prepared_plain(data, tok, sft_args(tmp_path, max_length=60), tiny_phi3)
    assert rows(ours.train) == rows(want)
    assert "tokenizing whole texts" in caplog.text


def test_cut_points_sit_between_a_letter_and_a_space_letter():
    text = "alpha beta, gamma 12 delta\\nepsilon zeta"
    for limit in range(1, len(text)):
        p = encoding._cut_point(text, limit)
        assert p == len(text) or (p <= limit and text[p - 1].isalpha() and text[p] == " " and text[p + 1].isalpha())
    assert encoding._cut_point(text, 36) == text.index(" zeta") and encoding._cut_point(text, 35) == text.index(" beta")
    assert encoding._cut_point("x" * 50, 20) == 50  # no boundary: no cut
