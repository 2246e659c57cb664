"""Documents read from .jsonl, .jsonl.gz and .parquet (formats.read_documents): the same documents
and token files from every format, Parquet read in batches, named text and id fields, made ids, and
errors that name file and line (or row). The Parquet tests need pyarrow and skip without it."""
import gzip
import json
import os
import subprocess
import sys

import pytest

import formats
import pack
from formats import DataError, read_documents
from support import assert_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [{"id": f"doc-{i}", "text": f"Document {i} says something{' more' * i}."} for i in range(5)]


def pyarrow_or_skip():
    return pytest.importorskip("pyarrow", reason="pyarrow is not installed: Parquet input is optional")


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_parquet(path, columns, row_group_size=None):
    pa = pyarrow_or_skip()
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)
    return str(path)


def packed(path, tmp_path):
    """The .bin bytes of the documents of `path` packed with gpt2:512."""
    prefix = str(tmp_path / os.path.basename(path).replace(".", "_"))
    pack.pack(path, prefix, tokenizer="gpt2:512", log=lambda *a: None)
    return open(prefix + ".bin", "rb").read()


def test_jsonl_and_gzipped_jsonl_give_the_same_documents_and_token_file(tmp_path):
    plain, gz = write_jsonl(tmp_path / "d.jsonl", DOCS), write_jsonl(tmp_path / "d.jsonl.gz", DOCS, gzip.open)
    assert list(read_documents(plain)) == list(read_documents(gz)) == [(n + 1, d) for n, d in enumerate(DOCS)]
    assert packed(plain, tmp_path) == packed(gz, tmp_path)


def test_parquet_gives_the_same_documents_and_token_file_read_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "PARQUET_BATCH_ROWS", 2)   # 5 rows in 3 batches, over 2 row groups
    path = write_parquet(tmp_path / "d.parquet", {"id": [d["id"] for d in DOCS], "text": [d["text"] for d in DOCS]},
                         row_group_size=3)
    assert list(read_documents(path)) == list(enumerate(DOCS))   # rows counted from 0
    assert packed(path, tmp_path) == packed(write_jsonl(tmp_path / "d.jsonl", DOCS), tmp_path)


def test_named_fields_and_made_ids(tmp_path):
    rows = [{"doc": d["id"], "body": d["text"]} for d in DOCS]
    jsonl = write_jsonl(tmp_path / "named.jsonl", rows)
    assert [d for _, d in read_documents(jsonl, text_field="body", id_field="doc")] == DOCS
    assert [d["id"] for _, d in read_documents(jsonl, text_field="body", id_field="")] == \
        [f"named.jsonl/{line}" for line in range(1, 6)]
    no_ids = write_parquet(tmp_path / "shard-00.parquet", {"content": [d["text"] for d in DOCS],
                                                          "url": ["u"] * 5})
    docs = [d for _, d in read_documents(no_ids, text_field="content")]
    assert docs == [{"id": f"shard-00.parquet/{row}", "text": d["text"]} for row, d in enumerate(DOCS)]
    named = write_parquet(tmp_path / "n.parquet", {"key": [d["id"] for d in DOCS], "content": [d["text"] for d in DOCS]})
    assert [d for _, d in read_documents(named, text_field="content", id_field="key")] == DOCS
    # the ids of a Parquet file are made only where it has no id column: one that has one keeps them
    ids = write_parquet(tmp_path / "i.parquet", {"id": ["x", "y"], "text": ["a", "b"]})
    assert [d["id"] for _, d in read_documents(ids)] == ["x", "y"]
    assert [d["id"] for _, d in read_documents(ids, id_field="")] == ["i.parquet/0", "i.parquet/1"]


@pytest.mark.parametrize("columns,kw,where,flag", [
    ({"id": ["a", "b", "c"], "text": ["x", None, "z"]}, {}, "bad.parquet:row 1: field 'text'", None),
    ({"id": ["a", None], "text": ["x", "y"]}, {}, "bad.parquet:row 1: field 'id'", None),
    ({"id": ["a"], "body": ["x"]}, {}, "bad.parquet: no column 'text'", "--text_field"),
    ({"id": ["a"], "text": ["x"]}, {"id_field": "key"}, "bad.parquet: no column 'key'", "--id_field"),
    ({"id": [1, 2], "text": ["x", "y"]}, {}, "bad.parquet: column 'id' holds int64", "--id_field ''"),
    ({"id": ["a"], "text": [3]}, {}, "bad.parquet: column 'text' holds int64", None),
])
def test_bad_parquet_names_file_and_row(tmp_path, columns, kw, where, flag):
    path = write_parquet(tmp_path / "bad.parquet", columns)
    with pytest.raises(DataError) as e:
        list(read_documents(path, **kw))
    assert where in str(e.value) and (flag is None or flag in str(e.value))


def test_bad_gzip_and_not_parquet_name_the_file(tmp_path):
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in DOCS).encode())[:-20])   # truncated
    with pytest.raises(DataError, match="cut.jsonl.gz:[0-9]+: cannot be read as gzip"):
        list(read_documents(str(gz)))
    plain = tmp_path / "plain.jsonl.gz"   # not gzip at all
    plain.write_text(json.dumps(DOCS[0]) + "\n")
    with pytest.raises(DataError, match="plain.jsonl.gz:1: cannot be read as gzip"):
        list(read_documents(str(plain)))
    bad_line = write_jsonl(tmp_path / "line.jsonl.gz", [DOCS[0], '{"id": "q"'], gzip.open)
    with pytest.raises(DataError, match="line.jsonl.gz:2: malformed JSON"):
        list(read_documents(bad_line))
    pyarrow_or_skip()
    fake = tmp_path / "fake.parquet"
    fake.write_text(json.dumps(DOCS[0]) + "\n")
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        list(read_documents(str(fake)))


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pack.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_pack_cli_reads_parquet_with_named_columns_and_names_the_row(tmp_path):
    good = write_parquet(tmp_path / "g.parquet", {"body": [d["text"] for d in DOCS]})
    r = cli("--real", good, "--text_field", "body", "--tokenizer", "gpt2:512", "--out_prefix", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    assert formats.TokenFile(str(tmp_path / "g")).starts.size == len(DOCS)
    dup = write_parquet(tmp_path / "dup.parquet", {"id": ["a", "b", "a"], "text": ["x", "y", "z"]})
    r = cli("--real", dup, "--out_prefix", tmp_path / "d")
    assert_error(r.returncode, r.stderr, f"{dup}:row 2", f"{dup}:row 0")   # the duplicate and the first
    assert not os.path.exists(tmp_path / "d.bin")
