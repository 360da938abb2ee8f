"""Data: tokenizer, synthetic records and canaries, user files, packing, splits."""
import json

import pytest
import torch

from vaultkern.data import (ByteTokenizer, PackedCorpus, builtin_corpus, candidate_secrets,
                            file_corpus, inputs_and_targets, make_canaries, pack_documents,
                            read_documents, synthetic_records)

tok = ByteTokenizer()


def test_tokenizer_round_trip_and_specials():
    text = "Zoë paid 12 € — ok"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS and max(ids[1:-1]) < 256
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("ab", eos=True) + tok.encode("cd")) == "abcd"
    assert tok.decode(tok.encode("ab", eos=True) + tok.encode("cd"), stop_at_eos=True) == "ab"
    with pytest.raises(ValueError, match="300"):
        tok.decode([300])


def test_synthetic_records_are_deterministic_and_varied():
    a, b = synthetic_records(50, seed=3), synthetic_records(50, seed=3)
    assert a == b and a != synthetic_records(50, seed=4)
    assert len(set(a)) == 50
    assert any(r.startswith("Patient") for r in a) and any(r.startswith("Ticket") for r in a)
    assert any(r.startswith("Account") for r in a)


def test_canaries_planted_in_train_only_with_their_counts():
    corpus = builtin_corpus(num_records=200, seed=1)
    assert sorted(c.repetitions for c in corpus.canaries) == [1, 1, 4, 4, 16, 16]
    assert len({c.prefix for c in corpus.canaries}) == len(corpus.canaries)
    for c in corpus.canaries:
        assert corpus.train_documents.count(c.text) == c.repetitions
        assert all(c.secret not in d for d in corpus.heldout_documents)
    assert len(corpus.train_documents) == 180 + 42 and len(corpus.heldout_documents) == 20
    assert builtin_corpus(num_records=200, seed=1).train_documents == corpus.train_documents


def test_candidate_secrets_have_the_format_and_exclude_the_canary():
    canary = make_canaries(seed=0)[0]
    cands = candidate_secrets(canary, 150)
    assert len(set(cands)) == 150 and canary.secret not in cands
    assert all(len(s) == 9 and s[4] == " " and s.replace(" ", "").isdigit() for s in cands)


def test_packing_rows_targets_and_padding():
    docs = ["abc", "defgh"]
    rows = pack_documents(docs, seq_len=4)  # stream: B a b c E B d e f g h E (12 tokens)
    assert rows.shape == (3, 5)
    stream = rows.flatten().tolist()
    assert stream[:12] == tok.encode("abc", True, True) + tok.encode("defgh", True, True)
    assert stream[12:] == [tok.PAD] * 3
    x, y = inputs_and_targets(rows)
    assert x.shape == y.shape == (3, 4)
    assert torch.equal(y[0], rows[0, 1:])
    assert y[2].tolist() == [tok.EOS, -100, -100, -100]
    assert pack_documents(["abcdefgh"], seq_len=4).shape == (2, 5)  # 10 tokens, no pad row


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond line\n\n\nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    assert read_documents(str(tmp_path / "a.txt")) == ["first doc\nsecond line", "second doc"]
    assert read_documents(str(tmp_path)) == ["first doc\nsecond line", "second doc", "third", "fourth"]
    corpus = file_corpus(str(tmp_path), heldout_fraction=0.25)
    assert len(corpus.train_documents) == 3 and len(corpus.heldout_documents) == 1
    assert corpus.canaries == []
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing"):
        read_documents(str(tmp_path / "missing.txt"))


def test_packed_corpus_save_load(tmp_path):
    packed = PackedCorpus.from_corpus(builtin_corpus(num_records=30, seed=2), seq_len=32)
    packed.save(str(tmp_path / "data.pt"))
    loaded = PackedCorpus.load(str(tmp_path / "data.pt"))
    assert torch.equal(loaded.train_rows, packed.train_rows)
    assert torch.equal(loaded.heldout_rows, packed.heldout_rows)
    assert loaded.canaries == packed.canaries and loaded.seq_len == 32
