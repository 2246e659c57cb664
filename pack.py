r"""
pack.py: tokenize real and synthetic documents and pack them into one token file per stream.

    python pack.py --real sample_data/train.jsonl --mode real --out_prefix out/data/real
    python pack.py --real sample_data/train.jsonl --synthetic sample_data/synthetic/rephrase.jsonl \
        --mode sorted --G 4 --out_prefix out/data/sorted     # megadocs, real document last
    python pack.py ... --mode sorted --real_position front    # or: none (no real document)
    python pack.py ... --mode shuffled                        # rephrases as separate documents
    python pack.py --real ... --synthetic sample_data/synthetic/latent.jsonl --mode latent --G 2

Reads:  real documents, JSONL {"id", "text", ...}, gzipped JSONL (.jsonl.gz) or Parquet (.parquet;
        --text_field and --id_field name the fields, see formats.read_documents); synthetic
        records written by generate.py, JSONL (or .jsonl.gz) {"id", "source_id", "kind", "index",
        "text", "finish_reason", ...} (+ "cut_char" and "cut_rule" for latent thoughts; a file cut
        under generate.py's older rule is refused).
Writes: a token file (format in formats.py) at --out_prefix PREFIX: PREFIX.bin (uint16/uint32
        tokens), PREFIX.idx (one record per document: start offset, source-group id, kind),
        PREFIX.json (the pack's settings and summary: documents and tokens per kind, ...).
        They appear only when complete: after an error (one line "error: ...", exit 2) or Ctrl-C
        (exit 130) no temporary file is left and a token file already at PREFIX is untouched.

Every document starts with the BOS token (<|endoftext|> for GPT-2). Documents are joined into one
stream; train.py cuts it into fixed windows of --block_size tokens, so a megadoc longer than that
continues in the next window. The source-group id of a document is the index of its real source
document, which is what the `megadoc` attention mask compares.

The stream modes (G = generations used per source: those with index < G, so one generation run at
G = 32 serves every smaller G; for thoughts too, since thought i sits at the i-th cut of one
nested order, see generate.latent_cuts; every mode but real needs --G):
  real      real documents only, shuffled.
  shuffled  real documents + every rephrase as its own document, all shuffled together.
  sorted    one megadoc per source: its G rephrases in index order, then the real document
            (--real_position back, the paper's default; or front; or none). Megadocs are shuffled.
  latent    one stretched document per source: the real text cut at the cut points of its
            thoughts 0 .. G-1, each thought inserted at its own cut (in document order, whatever
            its index) between THOUGHT_OPEN and THOUGHT_CLOSE.
Self-distillation samples are packed like rephrases (--synthetic_kind self-distill). A synthetic
record whose source_id is not among the real documents is left out, with a warning line; if that
leaves none, or the files hold no usable record of the kind, it is an error.

Memory does not grow with the corpus text: documents are read and tokenized in batches into a
temporary token store on disk, and only a few integers per document stay in memory.
"""
import array
import hashlib
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter

import numpy as np

import cli
from formats import (DataError, GENERATION_SETTINGS, KINDS, TokenWriter, file_paths, place, read_documents, read_jsonl,
                     require, require_nested_cuts, token_dtype)
from tokenizer import load_tokenizer


THOUGHT_OPEN, THOUGHT_CLOSE = "\n\n<thought>\n", "\n</thought>\n\n"   # around each latent thought


# -----------------------------------------------------------------------------
# reading documents

class SegmentStore:
    """Tokenized text segments in a temporary file on disk. Texts are tokenized in batches by
    `threads` worker threads, each encoding a contiguous slice of the batch (tiktoken releases the
    GIL while it encodes; one task per slice instead of encode_ordinary_batch's one per text
    saves a thread hand-off per document), and reading the next batch overlaps with tokenizing
    this one. Segments are numbered in the order they were added; `get` reads one
    back with pread (a memory map would count the whole file as resident memory once read)."""

    def __init__(self, path, enc, dtype, threads, batch_chars=1 << 22):
        self.path, self.enc, self.dtype, self.threads = path, enc, dtype, threads
        self.offsets, self.lengths = array.array("q"), array.array("q")
        self.queue, self.queued_chars, self.n_added, self.n_written, self.batch_chars = [], 0, 0, 0, batch_chars
        self.workers, self.in_flight, self.fd = ThreadPoolExecutor(threads), [], None
        self.file = open(path, "wb")   # last: if anything above fails, there is no file to remove

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, text):
        self.queue.append(text)
        self.queued_chars += len(text)
        self.n_added += 1
        if self.queued_chars >= self.batch_chars:
            self.flush()
        return self.n_added - 1

    def flush(self):
        """Hand the queued texts to the tokenizer thread (after writing the previous batch)."""
        self.write_finished()
        if not self.queue:
            return
        step = -(-len(self.queue) // self.threads)
        encode = lambda texts: [self.enc.encode_ordinary(t) for t in texts]
        self.in_flight = [self.workers.submit(encode, self.queue[i: i + step]) for i in range(0, len(self.queue), step)]
        self.queue, self.queued_chars = [], 0

    def write_finished(self):
        if not self.in_flight:
            return
        encoded = [ids for task in self.in_flight for ids in task.result()]
        self.in_flight = []
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self.offsets.extend((self.n_written + np.cumsum(lengths) - lengths).tolist())
        self.lengths.extend(lengths.tolist())
        total = int(lengths.sum())
        self.file.write(np.fromiter(itertools.chain.from_iterable(encoded), dtype=self.dtype, count=total).tobytes())
        self.n_written += total

    def get(self, segment):
        if self.fd is None:
            self.flush()
            self.write_finished()
            self.file.close()
            self.fd = os.open(self.path, os.O_RDONLY)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self.fd, self.lengths[segment] * size, self.offsets[segment] * size), self.dtype)

    def close(self):
        """Remove the temporary file, then stop the workers. The file goes first: waiting for the
        workers to finish the slices they are encoding can take a second, and a second Ctrl-C then
        must not leave it behind."""
        os.remove(self.path)
        self.file.close()
        if self.fd is not None:
            os.close(self.fd)
        self.workers.shutdown(cancel_futures=True)


def id_hash(*parts):
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def first_duplicate(hashes, where):
    """If two entries of `hashes` are equal, return the places (file:line) of the first such pair."""
    hashes = np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, np.uint64)
    order = np.argsort(hashes, kind="stable")
    same = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    if len(same) == 0:
        return None
    a, b = sorted((order[same[0]], order[same[0] + 1]))
    return where(a), where(b)


def read_synthetic(paths, kind, G, keep_truncated, store, counts, settings):
    """Synthetic records of `kind` with index < G -> a dict of arrays over the usable records:
    "source" (hash of source_id), "index", "segment", "cut" (cut_char; -1 unless latent) and
    "where" (file and line numbers, for messages). Everything not used is counted in `counts`, and
    the usable records by their generation settings (formats.GENERATION_SETTINGS) in `settings`."""
    cols = {name: array.array("q") for name in ("index", "segment", "cut", "file", "line")}
    source = array.array("Q")
    hashes, files, lines = array.array("Q"), array.array("q"), array.array("q")   # two hashes per record
    for file_no, path in enumerate(paths):
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            rec_id = require(obj, "id", (str,), where)
            source_id = require(obj, "source_id", (str,), where)
            rec_kind = require(obj, "kind", (str,), where)
            rec_index = require(obj, "index", (int,), where)
            text = require(obj, "text", (str,), where)
            hashes.append(id_hash(rec_id))
            hashes.append(id_hash(source_id, rec_kind, rec_index))
            files.append(file_no)
            lines.append(lineno)
            if rec_kind not in KINDS[1:]:
                raise DataError(f"{where}: unknown kind {rec_kind!r} (expected one of {KINDS[1:]})")
            if rec_index < 0:
                raise DataError(f"{where}: negative index {rec_index}")
            counts["records read"] += 1
            if rec_kind != kind:
                counts[f"records of another kind ({rec_kind}), not used"] += 1
                continue
            if rec_index >= G:
                counts[f"records with index >= G = {G}, not used"] += 1
                continue
            if obj.get("finish_reason") == "length" and not keep_truncated:
                counts["truncated generations (finish_reason 'length'), excluded"] += 1
                continue
            if not text.strip():
                counts["empty generations, excluded"] += 1
                continue
            if kind == "latent":
                require_nested_cuts(obj, where)
            settings[tuple(obj.get(name) for name in GENERATION_SETTINGS)] += 1
            cols["cut"].append(require(obj, "cut_char", (int,), where) if kind == "latent" else -1)
            source.append(id_hash(source_id))
            cols["index"].append(rec_index)
            cols["segment"].append(store.add(text))
            cols["file"].append(file_no)
            cols["line"].append(lineno)
    dup = first_duplicate(hashes, lambda i: f"{paths[files[i // 2]]}:{lines[i // 2]}")
    if dup:
        raise DataError(f"duplicate synthetic record: {dup[1]} repeats the id or the "
                        f"(source_id, kind, index) of {dup[0]}")
    as_np = lambda a, dtype=np.int64: np.frombuffer(a, dtype=dtype) if len(a) else np.zeros(0, dtype)
    return {"source": as_np(source, np.uint64), **{k: as_np(v) for k, v in cols.items()}}


def read_real(path, store, cuts_of=None, text_field="text", id_field=None):
    """Real documents (JSONL, gzipped JSONL or Parquet: formats.read_documents) -> (hash of each
    id, first segment of each document, its number of segments). A document is one segment, except
    in latent mode, where cuts_of(id hash) gives the character offsets its thoughts cut it at and
    each piece is a segment. Group g is the g-th document."""
    hashes, first, count, lines = array.array("Q"), array.array("q"), array.array("q"), array.array("q")
    for lineno, obj in read_documents(path, text_field, id_field):
        where = place(path, lineno)
        doc_id, text = obj["id"], obj["text"]
        if not text.strip():
            raise DataError(f"{where}: document {doc_id!r} has empty text")
        hashes.append(id_hash(doc_id))
        lines.append(lineno)
        cuts = cuts_of(hashes[-1]) if cuts_of else []
        if cuts and not (0 < cuts[0] and cuts[-1] < len(text)):
            raise DataError(f"{where}: a latent thought of {doc_id!r} cuts at {cuts}, outside "
                            f"the document's {len(text)} characters")
        if len(set(cuts)) < len(cuts):
            raise DataError(f"{where}: two latent thoughts of {doc_id!r} cut at the same place ({cuts})")
        bounds = [0] + cuts + [len(text)]
        first.append(store.add(text[0:bounds[1]]))
        for a, b in zip(bounds[1:], bounds[2:]):
            store.add(text[a:b])
        count.append(len(bounds) - 1)
    dup = first_duplicate(hashes, lambda i: place(path, lines[i]))
    if dup:
        raise DataError(f"duplicate document id: {dup[1]} repeats the id of {dup[0]}")
    if not lines:
        raise DataError(f"{path}: no documents")
    return (np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(first, dtype=np.int64),
            np.frombuffer(count, dtype=np.int64))


# -----------------------------------------------------------------------------
# packing

REAL_DOC, SYN_DOC, LATENT_DOC = 0, 1, 2   # what a packed document is made of (see document_order)


def document_order(mode, n_real, syn_source, syn_index, real_position, rng):
    """The packed stream, as three arrays over its documents: what each is (REAL_DOC: real
    document `item`; SYN_DOC: synthetic record `item`; LATENT_DOC: real document `item` stretched
    with its thoughts), `item`, and its source group. This is the megadoc logic."""
    if mode == "real" or mode == "latent":
        sources = rng.permutation(n_real)
        has_thoughts = np.bincount(syn_source, minlength=n_real)[sources] > 0
        return np.where(has_thoughts, LATENT_DOC, REAL_DOC), sources, sources
    real = np.arange(n_real) if real_position != "none" else np.zeros(0, np.int64)
    what = np.concatenate([np.full(len(syn_source), SYN_DOC), np.full(len(real), REAL_DOC)])
    item = np.concatenate([np.arange(len(syn_source)), real])
    group = np.concatenate([syn_source, real])
    if mode == "shuffled":   # every document on its own, in one random order
        order = rng.permutation(len(item))
        return what[order], item[order], group[order]
    # sorted: megadocs in a random order; inside one, the records by index and the real document
    # last ("back") or first ("front")
    rank = np.argsort(rng.permutation(n_real))           # the position of each source's megadoc
    index = np.concatenate([syn_index, np.full(len(real), np.iinfo(np.int64).max if real_position == "back" else -1)])
    order = np.lexsort((index, rank[group]))
    return what[order], item[order], group[order]


def windows_with_repeated_source(starts, groups, n_tokens, block_size):
    """Share of block_size windows (train.py's fixed cut) that hold >= 2 documents of one source."""
    n_windows = max((n_tokens - 1) // block_size, 0)
    if n_windows == 0:
        return 0.0
    ends = np.append(starts[1:], n_tokens)
    first, last = starts // block_size, np.minimum((ends - 1) // block_size, n_windows - 1)
    keep = first < n_windows
    first, last, groups = first[keep], last[keep], groups[keep]
    span = last - first + 1
    window = np.repeat(first, span) + (np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span))
    key = window * (groups.max() + 1) + np.repeat(groups, span)
    keys, counts = np.unique(key, return_counts=True)
    return len(np.unique(keys[counts >= 2] // (groups.max() + 1))) / n_windows


MODES = ("real", "shuffled", "sorted", "latent")
REAL_POSITIONS = ("back", "front", "none")
SYNTHETIC_KINDS = ("rephrase", "self-distill")


def pack(real_path, out, mode="real", synthetic=(), G=None, real_position="back",
         synthetic_kind=None, seed=0, tokenizer="gpt2", keep_truncated=False, block_size=1024,
         threads=8, log=print, warn=lambda message: print(message, file=sys.stderr), text_field="text", id_field=None):
    """Pack one stream into the token file at prefix `out`; returns its summary (also written to
    OUT.json). Before any work is done, a setting it cannot use is a ValueError and an input or
    tokenizer file it cannot open a DataError; bad input found later is a DataError naming file
    and line, and so is a synthetic stream none of whose records belongs to a real document. G
    is needed by every mode but real. Synthetic records whose source is not among the real
    documents are left out, with one line passed to `warn` (stderr by default); records generated
    under different settings are packed, with one line too."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (expected one of {MODES})")
    if mode != "real" and not synthetic:
        raise ValueError(f"mode {mode!r} needs --synthetic records")
    if mode != "real" and G is None:
        raise ValueError(f"mode {mode!r} needs --G, the generations per source to use (those with index < G)")
    if real_position not in REAL_POSITIONS:
        raise ValueError(f"unknown real_position {real_position!r} (expected one of {REAL_POSITIONS})")
    if synthetic_kind not in (None,) + SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic_kind {synthetic_kind!r} (expected one of {SYNTHETIC_KINDS})")
    for name, value in (("G", G), ("block_size", block_size), ("threads", threads)):
        if value is not None and not value >= 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not os.path.basename(out):
        raise ValueError(f"the output prefix {out!r} names a folder; add a file name (it writes PREFIX.bin, ...)")
    synthetic = list(synthetic) if mode != "real" else []
    for flag, path in [("--real", real_path)] + [("--synthetic", p) for p in synthetic]:
        try:   # a missing input fails now, not after the others were read
            open(path, "rb").close()
        except OSError as e:
            raise DataError(f"{flag} {path}: {e.strerror}") from None
    t0 = time.time()
    try:
        enc, bos_id = load_tokenizer(tokenizer)
    except OSError as e:   # (a bad gpt2:N or a bad ranks line is a ValueError that names it)
        raise DataError(f"--tokenizer {tokenizer}: {e.strerror or e}") from None
    kind = "latent" if mode == "latent" else (synthetic_kind or "rephrase")
    dtype = token_dtype(enc.n_vocab)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    counts = Counter()
    with SegmentStore(file_paths(out)[0] + ".segments.tmp", enc, dtype, threads) as store:
        # synthetic records first: in latent mode their cut points decide how the real documents
        # are tokenized (piece by piece), so the real file is read once, after them
        settings = Counter()
        syn = read_synthetic(synthetic, kind, G, keep_truncated, store, counts, settings)
        if len(settings) > 1:   # e.g. a file grown by runs with another model, or several files
            differ = [name for i, name in enumerate(GENERATION_SETTINGS) if len({s[i] for s in settings}) > 1]
            warn(f"warning: the {sum(settings.values()):,} usable {kind} records of --synthetic {' '.join(synthetic)} "
                 f"were generated under {len(settings)} different settings (differing in {', '.join(differ)}; "
                 f"{', '.join(f'{n:,}' for n in sorted(settings.values(), reverse=True))} records); they are packed "
                 "together")
        by_source = np.lexsort((syn["cut"], syn["source"]))   # each source's records together, by cut
        sorted_source = syn["source"][by_source]

        def records_of(source_hash):
            """The records of one source, by cut (for thoughts: their order in the document)."""
            lo, hi = (np.searchsorted(sorted_source, source_hash, side) for side in ("left", "right"))
            return by_source[lo:hi]
        cuts_of = (lambda h: syn["cut"][records_of(h)].tolist()) if mode == "latent" else None
        real_hash, first, count = read_real(real_path, store, cuts_of, text_field, id_field)
        n_real = len(first)

        # each record's source group: the position of its source_id among the real documents
        real_order = np.argsort(real_hash)
        pos = np.minimum(np.searchsorted(real_hash[real_order], syn["source"]), n_real - 1)
        known = real_hash[real_order[pos]] == syn["source"]
        files = " ".join(synthetic)
        if mode != "real" and not known.any():   # a stream of real documents only, under a synthetic name
            unknown = "" if not len(known) else \
                f"; the source_id of all {len(known):,} of them is not among the {n_real:,} documents of {real_path}"
            raise DataError(f"--synthetic {files}: no usable record of kind {kind!r} with index < G = {G} "
                            f"({describe(counts)}){unknown}")
        if not known.all():
            counts["records whose source is not among the real documents, not used"] += int((~known).sum())
            u = int(np.argmin(known))
            counts["first unknown source"] = f"{synthetic[syn['file'][u]]}:{syn['line'][u]}"
            warn(f"warning: {int((~known).sum()):,} of {len(known):,} usable records of --synthetic {files} have a "
                 f"source_id that is not among the {n_real:,} documents of {real_path} (the first: "
                 f"{counts['first unknown source']}); they are left out")
        used = np.nonzero(known)[0]                  # the records that go into the stream
        syn_source = real_order[pos][used]

        rng = np.random.default_rng(seed)
        what, item, group = document_order(mode, n_real, syn_source, syn["index"][used], real_position, rng)
        kind_code = {REAL_DOC: 0, SYN_DOC: KINDS.index(kind), LATENT_DOC: KINDS.index("latent")}
        open_seg, close_seg = (store.add(THOUGHT_OPEN), store.add(THOUGHT_CLOSE)) if mode == "latent" else (-1, -1)
        with TokenWriter(out, enc.n_vocab, bos_id) as writer:
            for w, x, g in zip(what.tolist(), item.tolist(), group.tolist()):
                if w == SYN_DOC:
                    segs = [syn["segment"][used[x]]]
                else:
                    segs = list(range(first[x], first[x] + count[x]))
                if w == LATENT_DOC:   # piece 0, thought 0, piece 1, ..., thought G-1, piece G
                    thoughts = syn["segment"][records_of(real_hash[x])]
                    segs = segs[:1] + [seg for t, piece in zip(thoughts, segs[1:])
                                       for seg in (open_seg, t, close_seg, piece)]
                writer.add(kind_code[w], g, [store.get(seg) for seg in segs])
            index = writer.index()
            n_groups = len(np.unique(index["group"]))
            lengths = np.diff(np.append(index["start"], writer.n_tokens))
            per_kind = {k: [int(np.sum(index["kind"] == c)), int(lengths[index["kind"] == c].sum())]
                        for c, k in enumerate(KINDS)}
            writer.meta = summary = {
                "mode": mode, "G": G, "real_position": real_position if mode in ("sorted", "shuffled") else None,
                "synthetic_kind": kind if mode != "real" else None, "seed": seed, "tokenizer": tokenizer,
                "vocab_size": enc.n_vocab, "bos_id": bos_id, "real": real_path, "synthetic": list(synthetic),
                "documents": writer.n_docs, "tokens": writer.n_tokens,
                "per_kind": {k: {"documents": d, "tokens": t} for k, (d, t) in per_kind.items() if d},
                "sources": n_real,
                "sources with generations": len(np.unique(syn_source)),
                "sources with fewer than G generations": int(n_real - np.sum(
                    np.bincount(syn_source, minlength=n_real) >= G)) if mode != "real" else None,
                "mean megadoc tokens": writer.n_tokens / max(n_groups, 1),
                "block_size": block_size,
                "windows with 2+ documents of one source": windows_with_repeated_source(
                    index["start"], index["group"], writer.n_tokens, block_size),
                "records": dict(counts),
                "seconds": round(time.time() - t0, 2),
            }
    print_summary(out, summary, log)
    return summary


def describe(counts):
    """What became of the synthetic records read, in words: "8 records read, 2 records of another
    kind (latent), not used, ..."."""
    return ", ".join(f"{v:,} {k}" if isinstance(v, int) else f"{k} {v}" for k, v in counts.items()) \
        if counts else "no records read"


def print_summary(out, s, log=print):
    log(f"packed {out}.bin: mode {s['mode']}" + (f", G = {s['G']}" if s["mode"] != "real" else "") +
        f", {s['documents']:,} documents, {s['tokens']:,} tokens in {s['seconds']:.1f}s")
    for k, v in s["per_kind"].items():
        log(f"  {k:<13} {v['documents']:>9,} documents {v['tokens']:>12,} tokens")
    log(f"  mean megadoc (source group) length: {s['mean megadoc tokens']:,.1f} tokens")
    log(f"  windows of block_size {s['block_size']} holding 2+ documents of one source: "
        f"{100 * s['windows with 2+ documents of one source']:.1f}%")
    if s["mode"] != "real":
        log(f"  sources with generations: {s['sources with generations']:,} of {s['sources']:,}; "
            f"with fewer than G: {s['sources with fewer than G generations']:,}")
    for k, v in s["records"].items():
        log(f"  {k}: {v}")


def arg_parser():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--real", required=True, help="real documents: .jsonl {id, text}, .jsonl.gz or .parquet")
    ap.add_argument("--text_field", default="text", help="--real: the field (column) holding each document's text")
    ap.add_argument("--id_field", default=None,
                    help="--real: the field (column) holding each document's id (default: id; a Parquet file "
                         "without one gets ids NAME/ROW); '' makes the ids from file name and line or row")
    ap.add_argument("--synthetic", nargs="*", default=[], metavar="FILE",
                    help="generate.py output files, JSONL (needed by every mode but real)")
    ap.add_argument("--mode", default="real", choices=MODES,
                    help="the stream: real, shuffled, sorted (megadocs) or latent (see above)")
    ap.add_argument("--G", type=int, help="use the generations with index < G of each source (>= 1; needed by "
                                          "every mode but real)")
    ap.add_argument("--real_position", default="back", choices=REAL_POSITIONS,
                    help="sorted: the real document goes at the back or front of its megadoc; "
                         "none drops it (in shuffled too)")
    ap.add_argument("--synthetic_kind", default="rephrase", choices=SYNTHETIC_KINDS,
                    help="the records that shuffled and sorted pack: rephrase or self-distill")
    ap.add_argument("--keep_truncated", action="store_true",
                    help="keep generations cut at the length limit (finish_reason 'length')")
    ap.add_argument("--seed", type=int, default=0, help="seed of the document order")
    ap.add_argument("--tokenizer", default="gpt2", help="gpt2, gpt2:N (its first N ranks) or a tiktoken ranks file")
    ap.add_argument("--block_size", type=int, default=1024,
                    help="train.py's context length (>= 1), for the summary's share of windows "
                         "holding 2+ documents of one source")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="tokenizer threads (>= 1; default: one per core)")
    ap.add_argument("--out_prefix", required=True, metavar="PREFIX",
                    help="output path prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    return ap


def main(argv=None):
    """Exit codes (cli.py): 0 packed; 2 bad flags or input (one line "error: ..."); 130 interrupted."""
    args = arg_parser().parse_args(argv)
    try:
        pack(args.real, args.out_prefix, args.mode, args.synthetic, args.G, args.real_position,
             args.synthetic_kind, args.seed, args.tokenizer, args.keep_truncated, args.block_size, args.threads,
             text_field=args.text_field, id_field=args.id_field)
    except (DataError, ValueError) as e:
        cli.fail(e)
    except OSError as e:   # an output that cannot be written (a read-only folder, a full disk)
        cli.fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)
    except KeyboardInterrupt:   # pack()'s with blocks have removed the temporary files
        print("interrupted", file=sys.stderr)
        sys.exit(cli.INTERRUPTED)


if __name__ == "__main__":
    main()
