"""Data: tokenizer, synthetic records and canaries, user files, packing, splits."""
import json
from collections import Counter

import pytest
import torch

from vaultkern.data import (ByteTokenizer, PackedCorpus, builtin_corpus, candidate_secrets,
                            file_corpus, inputs_and_targets, make_canaries, pack_documents,
                            heldout_score, read_documents, rows_of_document, split_documents, synthetic_records)

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
    assert len(corpus.train_documents) + len(corpus.heldout_documents) == 200 + 42
    assert 8 <= len(corpus.heldout_documents) <= 35  # ~10 % of 200, by hash
    assert builtin_corpus(num_records=200, seed=1).train_documents == corpus.train_documents


def test_candidate_secrets_have_the_format_and_exclude_the_canary():
    canary = make_canaries(seed=0)[0]
    cands = candidate_secrets(canary, 150)
    assert len(set(cands)) == 150 and canary.secret not in cands
    assert all(len(s) == 9 and s[4] == " " and s.replace(" ", "").isdigit() for s in cands)


def test_packing_gives_each_document_its_own_rows():
    # T = 4: "abc" is B a b c E (5 tokens, 1 row); "defgh" is B d e f g h E (7 tokens, 2 rows
    # sharing one token, so every token after BOS is a target exactly once)
    assert rows_of_document("abc", 4).tolist() == [tok.encode("abc", True, True)]
    assert rows_of_document("defgh", 4).tolist() == [[tok.BOS, *b"def", ord("g")],
                                                     [ord("g"), ord("h"), tok.EOS, tok.PAD, tok.PAD]]
    assert rows_of_document("", 4).tolist() == [[tok.BOS, tok.EOS, tok.PAD, tok.PAD, tok.PAD]]
    assert len(rows_of_document("abcdefg", 4)) == 2  # 9 tokens: 8 targets in 2 rows of 4
    rows, per_document = pack_documents(["defgh", "abc"], seq_len=4)
    assert rows.shape == (3, 5) and sorted(per_document) == [1, 2]
    assert torch.equal(rows, pack_documents(["abc", "defgh"], seq_len=4)[0])  # order-free
    x, y = inputs_and_targets(rows_of_document_tensor("defgh"))
    assert x.shape == y.shape == (2, 4)
    assert y[1].tolist() == [ord("h"), tok.EOS, -100, -100]
    targets = [t for row in y.tolist() for t in row if t != -100]
    assert targets == tok.encode("defgh", False, True)  # each token predicted once


def rows_of_document_tensor(doc, seq_len=4):
    return torch.from_numpy(rows_of_document(doc, seq_len))


def _row_counter(rows):
    return Counter(tuple(r) for r in rows.tolist())


@pytest.mark.parametrize("position", [0, 37, 199])
def test_adding_or_removing_one_document_changes_only_its_rows(position):
    """The privacy unit: D and D + d differ in exactly d's rows (and their order is stable),
    and no other document moves across the train/held-out split."""
    seq_len = 32
    base = synthetic_records(200, seed=3)
    extra = "Patient Ada Abara, MRN 1234567: a much longer note " + "x" * 150  # spans 7 rows
    bigger = base[:position] + [extra] + base[position:]
    for fraction in (0.0, 0.2, 0.5):
        train_a, held_a = split_documents(base, fraction, seed=5)
        train_b, held_b = split_documents(bigger, fraction, seed=5)
        others = lambda docs: [d for d in docs if d != extra]  # noqa: E731
        assert others(held_b) == held_a and others(train_b) == train_a
        assert (extra in held_b) == (heldout_score(extra, 5) < fraction)
    rows_a, _ = pack_documents(base, seq_len)
    rows_b, per_document = pack_documents(bigger, seq_len)
    own = torch.from_numpy(rows_of_document(extra, seq_len))
    assert len(own) == 7 and max(per_document) == 7
    assert _row_counter(rows_b) == _row_counter(rows_a) + _row_counter(own)
    # the rows of D + d are those of D with d's rows inserted in one place
    start = next(i for i in range(len(rows_a) + 1)
                 if i == len(rows_a) or not torch.equal(rows_a[i], rows_b[i]))
    assert torch.equal(rows_b[start:start + len(own)], own)
    assert torch.equal(torch.cat([rows_b[:start], rows_b[start + len(own):]]), rows_a)


def test_split_is_a_stable_per_document_hash():
    docs = synthetic_records(400, seed=0)
    train, held = split_documents(docs, 0.25, seed=1)
    assert 60 <= len(held) <= 140 and len(train) + len(held) == 400
    # a document's side depends on (seed, text) only: any sub-list splits consistently
    sub_train, sub_held = split_documents(docs[::3], 0.25, seed=1)
    assert set(sub_held) == set(held) & set(docs[::3]) and set(sub_train) <= set(train)
    assert split_documents(docs, 0.25, seed=2)[1] != held
    assert split_documents(["same", "same", "other"] * 20, 0.5, seed=0)[1].count("same") in (0, 40)


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond line\n\n\nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    assert read_documents(str(tmp_path / "a.txt")) == ["first doc\nsecond line", "second doc"]
    assert read_documents(str(tmp_path)) == ["first doc\nsecond line", "second doc", "third", "fourth"]
    corpus = file_corpus(str(tmp_path), heldout_fraction=0.25)
    assert sorted(corpus.train_documents + corpus.heldout_documents) == sorted(
        read_documents(str(tmp_path)))
    assert corpus.canaries == [] and "a.txt" not in corpus.description  # the path stays private
    assert str(tmp_path) in corpus.private_description
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
    corpus = builtin_corpus(num_records=30, seed=2)
    longest = max(len(d.encode("utf-8")) + 2 for d in corpus.train_documents)  # + BOS, EOS
    assert loaded.max_rows_per_document == packed.max_rows_per_document == -(-(longest - 1) // 32)
    assert (loaded.num_train_documents, loaded.num_heldout_documents) == (
        packed.num_train_documents, packed.num_heldout_documents)
