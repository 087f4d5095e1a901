"""The data pipeline: records from JSONL, JSON, Parquet or text files (prompt/response, alpaca,
ShareGPT, chat messages, plain text), tokenized as transformers tokenizes them, with loss
masks, split for evaluation, and served as packed or length-bucketed int32 batches.

    from jpeft import assets
    from jpeft.models.tokenizer import Tokenizer
    from jpeft.train import data

    tok = Tokenizer.from_dir(assets.path("tiny-llama"))
    records = data.read_data(assets.path("data/train.jsonl"))   # format detected per file
    train, held_out = data.split_eval(records, fraction=0.1, seed=0)
    examples = data.encode_records(tok, train, max_len=256)
    batches = data.BatchIterator(examples, batch_size=16, seq_len=256, seed=0,
                                 pad_id=tok.pad_id or 0)
    batch = next(batches)    # input_ids, attention_mask, loss_mask, segment_ids, position_ids
    state = batches.state    # {"epoch": 0, "index": 1}: save it, pass it back to resume

The accepted keys of each format are in :data:`HELP` (also in ``jpeft train --help``).
"""

from jpeft.train.data.batches import BatchIterator
from jpeft.train.data.bucket import bucket_plan, default_buckets
from jpeft.train.data.collate import BatchPlan, collate
from jpeft.train.data.corpus import corpus_examples, read_documents
from jpeft.train.data.encode import encode_record, encode_records, generation_prompt, target_mask
from jpeft.train.data.example import Example, check_examples, fit_length
from jpeft.train.data.files import is_record_file, iter_records, read_records
from jpeft.train.data.formats import FORMATS, HELP, detect_format, parse_record
from jpeft.train.data.load import read_data
from jpeft.train.data.pack import pack_plan
from jpeft.train.data.records import Record
from jpeft.train.data.split import split_eval
from jpeft.train.data.templates import Rendered, exact_match, reference_answer, render_record

__all__ = [
    "FORMATS",
    "HELP",
    "BatchIterator",
    "BatchPlan",
    "Example",
    "Record",
    "Rendered",
    "bucket_plan",
    "check_examples",
    "collate",
    "corpus_examples",
    "default_buckets",
    "detect_format",
    "encode_record",
    "encode_records",
    "exact_match",
    "fit_length",
    "generation_prompt",
    "is_record_file",
    "iter_records",
    "pack_plan",
    "parse_record",
    "read_data",
    "read_documents",
    "read_records",
    "reference_answer",
    "render_record",
    "split_eval",
    "target_mask",
]
