"""Data: byte tokenizer, built-in synthetic records with canaries, user text files, packing."""
from vaultkern.data.corpus import (Corpus, PackedCorpus, builtin_corpus, builtin_user_corpus,
                                   file_corpus, heldout_score, read_documents, split_documents)
from vaultkern.data.packing import inputs_and_targets, pack_documents, rows_of_document
from vaultkern.data.synthetic import (Canary, candidate_secrets, make_canaries, plant_canaries,
                                      random_secret, synthetic_records)
from vaultkern.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "Canary", "Corpus", "PackedCorpus", "builtin_corpus",
           "builtin_user_corpus",
           "candidate_secrets", "file_corpus", "heldout_score", "inputs_and_targets", "make_canaries",
           "pack_documents", "plant_canaries", "random_secret", "read_documents",
           "rows_of_document", "split_documents", "synthetic_records"]
