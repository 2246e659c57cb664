"""
formats.py: the project's file formats, in one place: documents read from JSONL, gzipped JSONL or
Parquet with file:line (file:row) errors, the fields of generate.py's records that pack.py checks,
the packed token files (OUT.bin / OUT.idx / OUT.json), atomic writes, and the repair of files
appended line by line after a crash. pack.py writes token files; train.py, evaluate.py and
generate.py read what they need from here.

    from formats import TokenFile, read_documents, read_jsonl
    tf = TokenFile("out/data/real")        # tokens (memory-mapped), document starts, groups, kinds
    for lineno, obj in read_jsonl("sample_data/train.jsonl"): ...          # any JSON objects (.gz too)
    for n, doc in read_documents("dclm/train.parquet"): doc["id"], doc["text"]   # documents, any format

Documents (read_documents): one {"id": str, "text": str} per JSON line of a .jsonl file (or of a
.jsonl.gz file), or per row of a .parquet file (read in batches of rows with pyarrow, an optional
package, so memory does not grow with the file). The text and id fields can be named (pack.py and
generate.py: --text_field, --id_field); a Parquet file without an id column, or any file read with
id_field "", gets the ids NAME/N (file name without folders, line or row N), so they do not change
when the file moves. Errors name the line (path:12) or the row, counted from 0 as pyarrow does
(path:row 11).

Token files (prefix OUT):
  OUT.bin   64-byte header (magic, version, token width, token count, vocabulary size, BOS id), then
            the tokens as little-endian uint16 (uint32 when the vocabulary exceeds 65,535 ids)
  OUT.idx   64-byte header (magic, version, document count, token count), then one record per
            document: start offset (int64), source-group id (int64), kind code (uint8, see KINDS)
  OUT.json  the pack's settings and summary (informational: nothing needs it to read the tokens)
Every document starts with the BOS token; the source-group id of a document is the index of its
real source document (what the `megadoc` attention mask compares).
"""
import gzip
import json
import os
import zlib
from contextlib import ExitStack, contextmanager

import numpy as np


@contextmanager
def atomic_open(path, mode="wb"):
    """Write `path` through `path.tmp`: on success the data is flushed to disk and renamed over
    `path` in one step; on any error or interrupt the temporary file is removed. Readers never
    see a half-written file under the final name."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -----------------------------------------------------------------------------
# input: JSONL records, documents (JSONL, gzipped JSONL, Parquet)

class DataError(Exception):
    """Bad input: the message names the file (and line) and what is wrong with it."""


def read_jsonl(path):
    """Yield (line number, object) for each non-blank line of a JSONL file (gzipped if its name ends
    in .gz); a bad line is an error naming it."""
    gzipped, lineno = path.endswith(".gz"), 0
    with (gzip.open if gzipped else open)(path, "rb") as f:   # decoded line by line: a bad byte is on a known line
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                    f"{e.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    # (some of json's messages end in "at", meant to be followed by a position)
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg.removesuffix(' at')} at column "
                                    f"{e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except (OSError, EOFError, zlib.error) as e:   # from gzip: not gzip data, a truncated or corrupt stream
            if not gzipped:
                raise
            raise DataError(f"{path}:{lineno + 1}: cannot be read as gzip ({e})") from None


def cut_partial_line(path):
    """Cut off the last line of a file appended to line by line (generate.py's output and failures,
    train.py's log) if it has no newline: a crash, a full disk or a power cut in the middle of
    writing it. Returns the number of bytes removed (0 also when there is no such file)."""
    if not os.path.exists(path):
        return 0
    with open(path, "r+b") as f:
        size = end = f.seek(0, os.SEEK_END)
        keep = 0
        while end > 0:   # look for the last newline from the end, a block at a time
            start = max(0, end - (1 << 16))
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            f.truncate(keep)
    return size - keep


def require(obj, field, types, where):
    value = obj.get(field)
    if not isinstance(value, types) or isinstance(value, bool):
        got = "missing" if field not in obj else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{where}: field {field!r} must be {'/'.join(t.__name__ for t in types)}, got {got}")
    return value


PARQUET_BATCH_ROWS = 1024   # rows read from a Parquet file at a time


def is_parquet(path):
    return path.endswith(".parquet")


def place(path, n):
    """How a message names document n of a file, as read_documents numbers them: path:LINE for
    JSONL, path:row N for Parquet (rows counted from 0)."""
    return f"{path}:row {n}" if is_parquet(path) else f"{path}:{n}"


def read_documents(path, text_field="text", id_field=None):
    """Yield (n, {"id": str, "text": str}) for each document of a .jsonl, .jsonl.gz or .parquet file,
    n its line (JSONL) or row (Parquet, from 0); see the module docstring. id_field None reads "id"
    (a Parquet file without that column gets made ids), "" makes the ids for any file. A document
    whose text or id is missing or not a string is an error naming its place."""
    made_id = lambda n: f"{os.path.basename(path)}/{n}"
    if not is_parquet(path):
        for lineno, obj in read_jsonl(path):
            where = place(path, lineno)
            doc_id = made_id(lineno) if id_field == "" else require(obj, id_field or "id", (str,), where)
            yield lineno, {"id": doc_id, "text": require(obj, text_field, (str,), where)}
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e)[:200]})") from None
    names = pf.schema_arrow.names
    if id_field is None:
        id_column = "id" if "id" in names else None
    else:
        id_column = id_field or None
    for column, flag in ((text_field, "--text_field"), (id_column, "--id_field")):
        if column is None:
            continue
        if column not in names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); name another with {flag}")
        kind = pf.schema_arrow.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            hint = "; --id_field '' numbers the rows instead" if flag == "--id_field" else ""
            raise DataError(f"{path}: column {column!r} holds {kind}, not strings{hint}")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[c for c in (text_field, id_column) if c]):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_column).to_pylist() if id_column else [made_id(row + i) for i in range(len(texts))]
            for text, doc_id in zip(texts, ids):
                for column, value in ((text_field, text), (id_column, doc_id)):
                    if column and value is None:   # the schema said strings: only a null is left to refuse
                        raise DataError(f"{place(path, row)}: field {column!r} must be str, got None")
                yield row, {"id": doc_id, "text": text}
                row += 1
    except (pa.ArrowException, OSError) as e:   # a corrupt page or column chunk
        raise DataError(f"{place(path, row)}: cannot be read ({str(e)[:200]})") from None


# What generate.py stores in each record about how it was made (generate.generation_settings): a
# resume into a file must use the same, and pack.py says when the records it packs differ in them.
# text_field and id_field are generate.py's flags of that name as given (read_documents): which
# field of --input each document's text and id were read from.
GENERATION_SETTINGS = ("model", "prompt", "prompt_sha256", "temperature", "api", "max_new_tokens", "seed",
                       "max_source_tokens", "tokenizer",   # (self-distill's prefix length is in its prompt name)
                       "text_field", "id_field")


# Latent thoughts record where they cut the document: "cut_char" (a character offset) and
# "cut_rule". Under the nested rule (generate.latent_cuts) thought `index` sits at cut rank
# `index` of one fixed order of positions, so --G k means ranks 0 .. k-1 for any k. Files from
# before it (cuts at i / (G + 1), a "num_cuts" field) mean something else for each G.
CUT_RULE = "nested"


def require_nested_cuts(obj, where):
    """A latent record must have been cut under CUT_RULE; an older file is refused, never misread."""
    if obj.get("cut_rule") != CUT_RULE:
        raise DataError(f"{where}: a latent thought cut under the old equal-pieces rule (num_cuts="
                        f"{obj.get('num_cuts')}), whose cut points move with G; write the thoughts again with "
                        "this generate.py into a new file")


# -----------------------------------------------------------------------------
# token files

TOKEN_MAGIC, INDEX_MAGIC, FORMAT_VERSION = b"NSYNTOK1", b"NSYNIDX1", 1
HEADER_BYTES = 64
KINDS = ("real", "rephrase", "latent", "self-distill")  # the kind codes stored in the index
INDEX_RECORD = np.dtype([("start", "<i8"), ("group", "<i8"), ("kind", "u1")])


def token_dtype(vocab_size):
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def file_paths(prefix):
    prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    return prefix + ".bin", prefix + ".idx", prefix + ".json"


class TokenFile:
    """A packed token file opened for reading: tokens (memory-mapped) and its document index.

    Anything that does not add up (magic, version, dtype, size against the header's count, a token
    id outside the vocabulary, document starts, BOS at every start) is refused with the reason."""

    def __init__(self, prefix):
        self.bin_path, self.idx_path, self.json_path = file_paths(prefix)
        for p in (self.bin_path, self.idx_path):
            if not os.path.exists(p):
                raise DataError(f"{p}: no such token file (run pack.py first)")
        with open(self.bin_path, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:8] != TOKEN_MAGIC:
            raise DataError(f"{self.bin_path}: not a nanosynth token file (bad magic or short header)")
        version, itemsize, n_tokens, self.vocab_size, self.bos_id = np.frombuffer(
            header, dtype="<u8", count=5, offset=8).tolist()
        if version != FORMAT_VERSION:
            raise DataError(f"{self.bin_path}: format version {version}, this pack.py reads {FORMAT_VERSION}")
        dtype = token_dtype(self.vocab_size)
        if itemsize != dtype.itemsize:
            raise DataError(f"{self.bin_path}: {itemsize}-byte tokens for vocabulary {self.vocab_size}")
        expected = HEADER_BYTES + n_tokens * itemsize
        actual = os.path.getsize(self.bin_path)
        if actual != expected:
            raise DataError(f"{self.bin_path}: truncated or corrupt: header says {n_tokens} tokens "
                            f"({expected} bytes), file has {actual} bytes")
        self.tokens = np.memmap(self.bin_path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
        # one pass over the tokens (a second or so per GB): an id beyond the vocabulary would
        # otherwise surface as an IndexError deep inside the model's embedding
        if n_tokens and int(self.tokens.max()) >= self.vocab_size:
            at = int(np.argmax(self.tokens >= self.vocab_size))
            raise DataError(f"{self.bin_path}: token id {int(self.tokens[at])} at position {at:,} is outside "
                            f"the vocabulary of {self.vocab_size} ids its header states")

        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or header[:8] != INDEX_MAGIC:
                raise DataError(f"{self.idx_path}: not a nanosynth index file (bad magic or short header)")
            version, n_docs, idx_tokens = np.frombuffer(header, dtype="<u8", count=3, offset=8).tolist()
            body = f.read()
            records = np.frombuffer(body[: len(body) - len(body) % INDEX_RECORD.itemsize], dtype=INDEX_RECORD)
        if version != FORMAT_VERSION or idx_tokens != n_tokens:
            raise DataError(f"{self.idx_path}: does not belong to {self.bin_path} "
                            f"(version {version}, {idx_tokens} tokens vs {n_tokens})")
        if len(records) != n_docs or len(body) % INDEX_RECORD.itemsize:
            raise DataError(f"{self.idx_path}: truncated or corrupt: header says {n_docs} documents, has {len(records)}")
        self.starts, self.groups, self.kinds = (records["start"].copy(), records["group"].copy(),
                                                records["kind"].copy())
        bad = (n_docs == 0 or self.starts[0] != 0 or np.any(np.diff(self.starts) <= 0)
               or self.starts[-1] >= n_tokens or np.any(self.kinds >= len(KINDS)))
        if bad or np.any(self.tokens[self.starts] != self.bos_id):
            raise DataError(f"{self.idx_path}: document starts are corrupt (not increasing from 0, "
                            f"out of range, or not on a BOS token)")
        self.meta = {}
        if os.path.exists(self.json_path):
            with open(self.json_path) as f:
                self.meta = json.load(f)

    def __len__(self):
        return len(self.tokens)

    def group_ids(self, start, length):
        """The source-group id of each token position in [start, start + length)."""
        doc = np.searchsorted(self.starts, np.arange(start, start + length), side="right") - 1
        return self.groups[doc]


class TokenWriter:
    """Writes a token file document by document: `with TokenWriter(prefix, vocab_size, bos_id) as w:
    w.add(...)`; set `w.meta` inside the block to write OUT.json as well. Each file is written
    through atomic_open, and they are renamed into place one after the other only once all are
    written: an error or an interrupt before then leaves no temporary file and leaves a token file
    already at the prefix untouched."""

    def __init__(self, prefix, vocab_size, bos_id):
        self.paths = file_paths(prefix)
        self.vocab_size, self.bos_id, self.dtype = vocab_size, bos_id, token_dtype(vocab_size)
        self.bos = np.array([bos_id], dtype=self.dtype)
        self.n_tokens = self.n_docs = 0
        self.pending, self.pending_docs = [], []
        self.meta = None

    def __enter__(self):
        with ExitStack() as files:   # an error in here removes what was opened
            self.bin = files.enter_context(atomic_open(self.paths[0]))
            self.idx = files.enter_context(atomic_open(self.paths[1]))
            self.bin.write(bytes(HEADER_BYTES))
            self.idx.write(bytes(HEADER_BYTES))
            self.files = files.pop_all()
        return self

    def add(self, kind, group, pieces):
        """One document: BOS followed by the token arrays in `pieces`."""
        self.pending_docs.append((self.n_tokens, group, kind))
        self.pending.append(self.bos)
        self.pending.extend(pieces)
        self.n_tokens += 1 + sum(len(p) for p in pieces)
        self.n_docs += 1
        if len(self.pending) > 4096:
            self.flush()

    def flush(self):
        if self.pending:
            self.bin.write(np.concatenate(self.pending).astype(self.dtype, copy=False).tobytes())
            self.idx.write(np.array(self.pending_docs, dtype=INDEX_RECORD).tobytes())
            self.idx.flush()
        self.pending, self.pending_docs = [], []

    def index(self):
        """The index records written so far (read back from the temporary file)."""
        self.flush()
        return np.fromfile(self.idx.name, dtype=INDEX_RECORD, offset=HEADER_BYTES)

    def __exit__(self, *exc):
        if exc[0] is not None:
            self.files.__exit__(*exc)   # removes every temporary file
            return False
        with self.files:   # on leaving: every file renamed into place or, after an error, every one removed
            self.flush()
            self.bin.seek(0)
            self.bin.write(TOKEN_MAGIC + np.array([FORMAT_VERSION, self.dtype.itemsize, self.n_tokens,
                                                   self.vocab_size, self.bos_id], dtype="<u8").tobytes())
            self.idx.seek(0)
            self.idx.write(INDEX_MAGIC + np.array([FORMAT_VERSION, self.n_docs, self.n_tokens], dtype="<u8").tobytes())
            if self.meta is not None:
                json.dump(self.meta, self.files.enter_context(atomic_open(self.paths[2], "w")), indent=1)
        return False
