"""The data pipeline: JSONL instruction records and text corpora, tokenized with loss masks,
split for evaluation, and served as packed or length-bucketed int32 batches.

    from jpeft.models.tokenizer import Tokenizer
    from jpeft.train import data

    tok = Tokenizer.from_dir("assets/tiny-llama")
    records = data.read_jsonl("assets/data/train.jsonl")
    train, held_out = data.split_eval(records, fraction=0.1, seed=0)
    examples = data.fit_length(data.encode_records(tok, train), max_len=256)
    batches = data.BatchIterator(examples, batch_size=16, seq_len=256, seed=0,
                                 pad_id=tok.pad_id or 0)
    batch = next(batches)    # input_ids, attention_mask, loss_mask, segment_ids, position_ids
    state = batches.state    # {"epoch": 0, "index": 1}: save it, pass it back to resume
"""

from jpeft.train.data.batches import BatchIterator
from jpeft.train.data.bucket import bucket_plan, default_buckets
from jpeft.train.data.collate import BatchPlan, collate
from jpeft.train.data.corpus import corpus_examples, read_documents
from jpeft.train.data.encode import (
    Example,
    encode_chunks,
    encode_record,
    encode_records,
    fit_length,
    generation_prompt,
)
from jpeft.train.data.jsonl import Record, iter_jsonl, read_jsonl
from jpeft.train.data.load import load_examples
from jpeft.train.data.pack import pack_plan
from jpeft.train.data.split import split_eval
from jpeft.train.data.templates import exact_match, record_chunks, reference_answer

__all__ = [
    "BatchIterator",
    "BatchPlan",
    "Example",
    "Record",
    "bucket_plan",
    "collate",
    "corpus_examples",
    "default_buckets",
    "encode_chunks",
    "encode_record",
    "encode_records",
    "exact_match",
    "fit_length",
    "generation_prompt",
    "iter_jsonl",
    "load_examples",
    "pack_plan",
    "read_documents",
    "read_jsonl",
    "record_chunks",
    "reference_answer",
    "split_eval",
]
