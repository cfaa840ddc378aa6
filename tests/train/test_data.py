"""Corpus loading, the train/validation split, tokenizers and the token stream."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.train.data import (
    DataError,
    Document,
    StreamDecoder,
    Tokenizer,
    TokenStream,
    embedded_corpus,
    load_documents,
    prepare_data,
    split_documents,
)

UNICODE = "naïve café — 日本語 😀\ttabs\r\nand  double  spaces \x00 nul\n"


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return embedded_corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return Tokenizer.train_bpe([d.text for d in corpus], vocab_size=1024)


# ------------------------------------------------------------------------------------------------ embedded corpus


def test_embedded_corpus_has_prose_and_code_documents_with_unique_sources(corpus):
    domains = {d.domain for d in corpus}
    assert domains == {"prose", "code"}
    sources = [d.source for d in corpus]
    assert len(set(sources)) == len(sources)
    assert all(s.startswith("pydoc:") for s in sources if not s.startswith("stdlib:"))
    assert all(d.text.strip() for d in corpus)


def test_embedded_code_excludes_tests_and_respects_the_size_cap():
    docs = embedded_corpus(max_code_bytes=200_000)
    code = [d for d in docs if d.domain == "code"]
    assert code and sum(len(d.text.encode()) for d in code) <= 200_000
    assert not any("/test/" in d.source or "/tests/" in d.source or "site-packages" in d.source for d in code)
    assert [d.source for d in code] == sorted(d.source for d in code)


def test_embedded_corpus_is_the_same_on_every_call(corpus):
    assert embedded_corpus() == corpus


# ----------------------------------------------------------------------------------------------------- loading


def test_a_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("hello\nworld\n")
    assert load_documents(path) == [Document("hello\nworld\n", "prose", "notes.md")]


def test_a_folder_is_read_recursively_in_path_order_skipping_binary_and_hidden_files(corpus_dir):
    (corpus_dir / "docs" / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (corpus_dir / "docs" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus_dir / ".git").mkdir()
    (corpus_dir / ".git" / "HEAD").write_text("ref: refs/heads/main")
    docs = load_documents(corpus_dir)
    names = [d.source for d in docs]  # relative to the folder: moving the corpus keeps its split
    prose = [f"docs/{n}.txt" for n in ("for", "function", "if", "try", "while", "with")]
    assert names == prose + ["src/a.py", "src/b.py"]
    assert {d.domain for d in docs if d.source.endswith(".py")} == {"code"}
    assert {d.domain for d in docs if d.source.endswith(".txt")} == {"prose"}


def test_jsonl_documents_come_from_the_text_field_with_an_optional_domain(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"body": "first", "domain": "news"}, {"body": "second"}, {"body": "   "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents(path, text_field="body")
    assert docs == [Document("first", "news", "data.jsonl:1"), Document("second", "prose", "data.jsonl:2")]


def test_jsonl_without_the_text_field_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl.*line 2.*'text'.*content.*--text-field"):
        load_documents(path)


def test_invalid_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_documents(path)


def test_missing_corpus_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_documents(tmp_path / "nowhere")


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="has no text"):
        load_documents(tmp_path / "empty")


def test_a_binary_file_given_by_name_is_an_error(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="model.bin.*not a UTF-8 text file"):
        load_documents(path)


# ------------------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_by_document_and_holds_out_every_domain(corpus):
    train, val = split_documents(corpus)
    assert (train, val) == split_documents(list(corpus))
    assert len(train) + len(val) == len(corpus)
    assert {d.source for d in train}.isdisjoint(d.source for d in val)
    assert {d.domain for d in val} == {"prose", "code"}
    for domain in ("prose", "code"):
        n = sum(d.domain == domain for d in corpus)
        assert sum(d.domain == domain for d in val) == max(1, round(0.05 * n))


def test_adding_a_document_does_not_move_the_others(corpus):
    _, val = split_documents(corpus)
    _, val_more = split_documents([*corpus, Document("new text", "prose", "extra:1")])
    # The new document can take at most one held-out place of its domain; every other document stays where it was.
    assert len({d.source for d in val} - {d.source for d in val_more}) <= 1


def test_another_seed_holds_out_other_documents(corpus):
    assert split_documents(corpus, seed=0)[1] != split_documents(corpus, seed=1)[1]


def test_a_single_document_is_cut_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document(text, "prose", "one.txt")])
    assert train[0].text + val[0].text == text
    assert val[0].text.startswith("line ") and 0.02 < len(val[0].text) / len(text) < 0.1


# -------------------------------------------------------------------------------------------------- tokenizers


def test_bpe_round_trips_every_document_of_the_embedded_corpus(corpus, bpe):
    assert bpe.vocab_size == 1024
    for doc in corpus:
        assert bpe.decode(bpe.encode(doc.text)) == doc.text, doc.source
    assert bpe.decode(bpe.encode(UNICODE)) == UNICODE


def test_bpe_compresses_and_training_is_deterministic(corpus, bpe):
    text = corpus[0].text
    assert len(bpe.encode(text)) < 0.5 * len(text.encode())
    again = Tokenizer.train_bpe([d.text for d in corpus], vocab_size=1024)
    assert again.to_str() == bpe.to_str()


def test_byte_tokenizer_ids_are_the_utf8_bytes_and_round_trip(corpus):
    tok = Tokenizer.bytes()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode(UNICODE) == list(UNICODE.encode("utf-8"))
    for doc in corpus[:5] + corpus[-5:]:
        assert tok.decode(tok.encode(doc.text)) == doc.text


def test_tokenizer_saves_as_tokenizer_json_and_loads_the_same(tmp_path, bpe):
    bpe.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.to_str() == bpe.to_str() and loaded.eos_id == bpe.eos_id
    assert loaded.encode(UNICODE) == bpe.encode(UNICODE)


def test_loading_a_broken_tokenizer_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_stream_decoder_holds_back_half_a_character():
    tok = Tokenizer.bytes()
    decoder = StreamDecoder(tok)
    pieces = [decoder.push([b]) for b in "a日b".encode()]
    assert pieces == ["a", "", "", "日", "b"]
    decoder.push([0xE6])  # the first byte of a 3-byte character, never completed
    assert decoder.flush() == "\ufffd"
    assert decoder.emitted == "a日b\ufffd"


# ------------------------------------------------------------------------------------------------ token stream


def _stream() -> TokenStream:
    docs = [Document("abc", "prose", "1"), Document("xy", "code", "2")]
    return TokenStream.from_documents(docs, Tokenizer.bytes(), ["code", "prose"])


def test_stream_ends_each_document_with_eos_and_tags_every_token_with_its_domain():
    stream = _stream()
    assert stream.ids.tolist() == [97, 98, 99, 256, 120, 121, 256]
    assert stream.domains.tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_max_tokens_keeps_the_first_tokens():
    docs = [Document("abc", "prose", "1"), Document("xy", "code", "2")]
    stream = TokenStream.from_documents(docs, Tokenizer.bytes(), ["code", "prose"], max_tokens=5)
    assert stream.ids.tolist() == [97, 98, 99, 256, 120]


def test_sampled_windows_are_shifted_targets_and_follow_the_generator():
    stream = TokenStream(torch.arange(100), torch.zeros(100, dtype=torch.uint8), ["prose"])
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    first = stream.sample(4, 10, gen)
    assert first.x.shape == (4, 10) and torch.equal(first.y, first.x + 1)
    assert int(first.y.max()) <= 99
    gen.set_state(state)
    assert torch.equal(stream.sample(4, 10, gen).x, first.x)


def test_sampling_from_a_stream_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than seq_len"):
        _stream().sample(1, 16, torch.Generator())


def test_eval_batches_are_fixed_and_cover_the_stream():
    stream = TokenStream(torch.arange(1000), torch.zeros(1000, dtype=torch.uint8), ["prose"])
    batches = list(stream.eval_batches(batch_size=3, seq_len=10, max_windows=8))
    assert [b.x.shape[0] for b in batches] == [3, 3, 2]
    starts = torch.cat([b.x[:, 0] for b in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 11
    assert all(torch.equal(a.x, b.x) for a, b in zip(batches, stream.eval_batches(3, 10, 8)))
    short = list(_stream().eval_batches(4, 64, 8))
    assert len(short) == 1 and short[0].x.shape == (1, 6)


def test_prepare_data_trains_the_tokenizer_on_the_training_split_and_fingerprints_the_stream(corpus_dir):
    data = prepare_data(corpus_dir, "bpe", vocab_size=300)
    assert data.tokenizer.vocab_size == 300
    assert data.train.domain_names == ["code", "prose"] and len(data.val) > 0
    assert data.train.fingerprint() == prepare_data(corpus_dir, "bpe", vocab_size=300).train.fingerprint()
    assert "8 documents" in data.summary()
