"""pack.py: exact token ids, exact document order for every mode, token file round trips, bad input,
synthetic records that belong to no real document, one-line errors and clean failures (no temporary
file left, a token file already at the prefix untouched, also on Ctrl-C). About 15 s on 2 cores."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pack
from formats import DataError, KINDS, TokenFile, read_jsonl
from support import assert_error
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC, BOS = load_tokenizer("gpt2")

REAL = [
    {"id": "a", "text": "Alpha is the first letter. It starts the alphabet. Greeks wrote it."},
    {"id": "b", "text": "Bravo is a word of praise."},
    {"id": "c", "text": "Charlie has no rephrases at all."},
]
SYNTH = [  # a has three rephrases (one beyond G=2), b has one plus a truncated one
    {"id": "a/rephrase/1", "source_id": "a", "kind": "rephrase", "index": 1, "text": "A1 text.", "finish_reason": "stop"},
    {"id": "a/rephrase/0", "source_id": "a", "kind": "rephrase", "index": 0, "text": "A0 text.", "finish_reason": "stop"},
    {"id": "a/rephrase/2", "source_id": "a", "kind": "rephrase", "index": 2, "text": "A2 text.", "finish_reason": "stop"},
    {"id": "b/rephrase/0", "source_id": "b", "kind": "rephrase", "index": 0, "text": "B0 text.", "finish_reason": "stop"},
    {"id": "b/rephrase/1", "source_id": "b", "kind": "rephrase", "index": 1, "text": "B1 cut", "finish_reason": "length"},
    {"id": "z/rephrase/0", "source_id": "z", "kind": "rephrase", "index": 0, "text": "Zulu.", "finish_reason": "stop"},
    {"id": "a/latent/0", "source_id": "a", "kind": "latent", "index": 0, "text": "Thought one.", "cut_char": 27, "cut_rule": "nested"},
    {"id": "a/latent/1", "source_id": "a", "kind": "latent", "index": 1, "text": "Thought two.", "cut_char": 51, "cut_rule": "nested"},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "real.jsonl", REAL), write_jsonl(tmp_path / "synth.jsonl", SYNTH)


def documents(prefix):
    """The packed stream back as (kind, group, text) per document."""
    tf = TokenFile(prefix)
    ends = list(tf.starts[1:]) + [len(tf)]
    out = []
    for s, e, g, k in zip(tf.starts, ends, tf.groups, tf.kinds):
        assert tf.tokens[s] == BOS
        out.append((KINDS[k], int(g), ENC.decode(tf.tokens[s + 1:e].tolist())))
    return out


def run(tmp_path, corpus, mode, **kw):
    out = str(tmp_path / mode)
    summary = pack.pack(corpus[0], out, mode, [corpus[1]], log=lambda *a: None, **kw)
    return documents(out), summary


def test_gpt2_ids_exact():
    assert ENC.encode_ordinary("Hello world") == [15496, 995]
    assert BOS == 50256 and ENC.n_vocab == 50257


def test_gpt2_ids_identical_to_tiktoken(tmp_path, monkeypatch):
    # tiktoken's "gpt2" and "r50k_base" are one vocabulary and one regex; r50k_base loads from the
    # ranks file we ship, placed in tiktoken's cache (named by the sha1 of its URL) instead of the
    # network. tiktoken checks the file's sha256 itself.
    import tiktoken
    import tiktoken.registry
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copy(os.path.join(ROOT, "assets", "gpt2.tiktoken"), tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("r50k_base")
    texts = [json.loads(l)["text"] for l in open(os.path.join(ROOT, "sample_data", "train.jsonl"))][:400]
    texts += ["  trailing spaces   ", "tabs\tand\nnewlines\n\n", "numbers 1234567 and 's 'll 've"]
    assert ENC.encode_ordinary_batch(texts) == reference.encode_ordinary_batch(texts)


def test_custom_ranks_file_and_uint32(tmp_path):
    # a tiny byte-level vocabulary plus unreachable filler tokens, large enough to need uint32
    import base64
    ranks = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell"]
    ranks += [b"\x00\x01" + i.to_bytes(3, "little") for i in range(70000 - len(ranks))]
    with open(tmp_path / "big.tiktoken", "wb") as f:
        for r, tok in enumerate(ranks):
            f.write(base64.b64encode(tok) + b" %d\n" % r)
    enc, bos = load_tokenizer(str(tmp_path / "big.tiktoken"))
    assert bos == 70000 and enc.n_vocab == 70001
    assert enc.encode_ordinary("hello") == [258, 111]  # "hell" + "o"
    real = write_jsonl(tmp_path / "r.jsonl", [{"id": "x", "text": "hello"}, {"id": "y", "text": "he"}])
    pack.pack(real, str(tmp_path / "big"), tokenizer=str(tmp_path / "big.tiktoken"), log=lambda *a: None)
    tf = TokenFile(str(tmp_path / "big"))
    assert tf.tokens.dtype == np.uint32 and tf.vocab_size == 70001
    assert sorted(tf.tokens.tolist()) == sorted([70000, 258, 111, 70000, 256])


def test_real_mode(tmp_path, corpus):
    docs, s = run(tmp_path, corpus, "real")
    assert sorted(docs) == sorted(("real", i, d["text"]) for i, d in enumerate(REAL))
    assert s["tokens"] == sum(len(ENC.encode_ordinary(d["text"])) + 1 for d in REAL)


def test_sorted_back_front_none(tmp_path, corpus):
    docs, s = run(tmp_path, corpus, "sorted", G=2)
    megadocs = {0: [("rephrase", 0, "A0 text."), ("rephrase", 0, "A1 text."), ("real", 0, REAL[0]["text"])],
                1: [("rephrase", 1, "B0 text."), ("real", 1, REAL[1]["text"])],
                2: [("real", 2, REAL[2]["text"])]}
    # megadocs are contiguous, in index order, real document last; their order is the seed's
    order = [g for i, (_, g, _) in enumerate(docs) if i == 0 or docs[i - 1][1] != g]
    assert sorted(order) == [0, 1, 2]
    assert docs == [d for g in order for d in megadocs[g]]
    assert s["records"]["truncated generations (finish_reason 'length'), excluded"] == 1
    assert s["records"]["records whose source is not among the real documents, not used"] == 1
    assert s["records"]["records with index >= G = 2, not used"] == 1
    assert s["records"]["records of another kind (latent), not used"] == 2
    assert s["sources with fewer than G generations"] == 2

    front, _ = run(tmp_path, corpus, "sorted", G=2, real_position="front")
    order = [g for i, (_, g, _) in enumerate(front) if i == 0 or front[i - 1][1] != g]
    assert front == [d for g in order for d in [megadocs[g][-1]] + megadocs[g][:-1]]

    none, _ = run(tmp_path, corpus, "sorted", G=2, real_position="none")
    assert none == [d for d in docs if d[0] != "real"]


def test_shuffled_is_sorted_multiset(tmp_path, corpus):
    sorted_docs, _ = run(tmp_path, corpus, "sorted", G=3)
    shuffled, _ = run(tmp_path, corpus, "shuffled", G=3)
    assert sorted(shuffled) == sorted(sorted_docs) and len(shuffled) == 7
    no_real, _ = run(tmp_path, corpus, "shuffled", G=3, real_position="none")
    assert sorted(no_real) == sorted(d for d in sorted_docs if d[0] != "real")


def test_keep_truncated_and_G_selection(tmp_path, corpus):
    docs, _ = run(tmp_path, corpus, "sorted", G=1, keep_truncated=True)
    assert [t for k, g, t in docs if k == "rephrase"] == ["A0 text.", "B0 text."] or \
        [t for k, g, t in docs if k == "rephrase"] == ["B0 text.", "A0 text."]
    docs, _ = run(tmp_path, corpus, "sorted", G=2, keep_truncated=True)
    assert ("rephrase", 1, "B1 cut") in docs


def test_latent_interleaving(tmp_path, corpus):
    docs, s = run(tmp_path, corpus, "latent", G=2)
    text = REAL[0]["text"]
    stretched = (text[:27] + pack.THOUGHT_OPEN + "Thought one." + pack.THOUGHT_CLOSE + text[27:51]
                 + pack.THOUGHT_OPEN + "Thought two." + pack.THOUGHT_CLOSE + text[51:])
    assert sorted(docs) == sorted([("latent", 0, stretched), ("real", 1, REAL[1]["text"]), ("real", 2, REAL[2]["text"])])
    docs1, _ = run(tmp_path, corpus, "latent", G=1)   # only thought 0
    assert ("latent", 0, text[:27] + pack.THOUGHT_OPEN + "Thought one." + pack.THOUGHT_CLOSE + text[27:]) in docs1


def test_latent_nested_ranks_exact_tokens(tmp_path):
    # thought i sits at cut rank i: rank 0 in the middle, rank 1 before it, rank 2 after it. --G k
    # inserts exactly ranks 0 .. k-1, each at its own cut, in document order
    text = "One two. Three four. Five six."
    real = write_jsonl(tmp_path / "real.jsonl", [{"id": "d", "text": text}])
    cuts = {0: 20, 1: 8, 2: 25}
    syn = write_jsonl(tmp_path / "syn.jsonl", [
        {"id": f"d/latent/{i}", "source_id": "d", "kind": "latent", "index": i, "text": f"T{i}.", "cut_char": c,
         "cut_rule": "nested", "finish_reason": "stop"} for i, c in cuts.items()])
    pieces = lambda *thoughts: [ENC.encode_ordinary(t) for t in thoughts]
    opened, closed = ENC.encode_ordinary(pack.THOUGHT_OPEN), ENC.encode_ordinary(pack.THOUGHT_CLOSE)
    expected = {
        1: [text[:20], 0, text[20:]],
        2: [text[:8], 1, text[8:20], 0, text[20:]],
        3: [text[:8], 1, text[8:20], 0, text[20:25], 2, text[25:]],
    }
    for G, parts in expected.items():
        pack.pack(real, str(tmp_path / f"g{G}"), "latent", [syn], G=G, log=lambda *a: None)
        want = [BOS]
        for part in parts:
            want += ENC.encode_ordinary(part) if isinstance(part, str) else opened + ENC.encode_ordinary(f"T{part}.") + closed
        assert TokenFile(str(tmp_path / f"g{G}")).tokens.tolist() == want
    # the G = 1 stream, as ids: "One two. Three four." <thought> "T0." </thought> " Five six."
    assert TokenFile(str(tmp_path / "g1")).tokens.tolist()[:13] == [50256, 3198, 734, 13, 7683, 1440, 13, 198, 198, 27, 28895, 29, 198]


def test_old_rule_thoughts_refused(tmp_path, corpus, capfd):
    old = write_jsonl(tmp_path / "old.jsonl", [{k: v for k, v in SYNTH[-2].items() if k != "cut_rule"} | {"num_cuts": 2}])
    with pytest.raises(SystemExit) as e:
        pack.main(["--real", corpus[0], "--synthetic", old, "--mode", "latent", "--G", "2",
                   "--out_prefix", str(tmp_path / "o")])
    err = capfd.readouterr().err
    assert_error(e.value.code, err, "old.jsonl:1")
    assert not glob.glob(str(tmp_path / "o.*"))


def test_deterministic_for_a_seed(tmp_path, corpus):
    outs = []
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        pack.pack(corpus[0], str(tmp_path / name), "shuffled", [corpus[1]], G=3, seed=seed, log=lambda *a: None)
        outs.append(open(tmp_path / f"{name}.bin", "rb").read() + open(tmp_path / f"{name}.idx", "rb").read())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_windows_with_repeated_source():
    # documents at 0, 3, 6, 9 of groups 0, 0, 1, 2 in 12 tokens; block_size 4 -> windows [0,4) [4,8)
    starts, groups = np.array([0, 3, 6, 9]), np.array([0, 0, 1, 2])
    assert pack.windows_with_repeated_source(starts, groups, 12, 4) == 0.5


@pytest.mark.parametrize("line,message", [
    ('{"id": "q", "text": "ok"', "malformed JSON"),
    ('{"id": "q", "text": "ok', r"malformed JSON \(Invalid control character at column 24\)"),   # not "at at"
    ('{"id": "q"}', "field 'text' must be str, got missing"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"id": "a", "text": "again"}', "duplicate document id"),
])
def test_bad_real_input_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", REAL + [line])
    with pytest.raises(DataError, match=message) as e:
        pack.pack(path, str(tmp_path / "o"), log=lambda *a: None)
    assert f"bad.jsonl:{len(REAL) + 1}" in str(e.value)
    assert not os.path.exists(tmp_path / "o.bin")


@pytest.mark.parametrize("record,message", [
    ({"id": "a/rephrase/0", "source_id": "b", "kind": "rephrase", "index": 5, "text": "x"}, "duplicate synthetic record"),
    ({"id": "new", "source_id": "a", "kind": "rephrase", "index": 0, "text": "x"}, "duplicate synthetic record"),
    ({"id": "n2", "source_id": "a", "kind": "rephrase", "index": "0", "text": "x"}, "field 'index' must be int"),
    ({"id": "n3", "source_id": "a", "kind": "poem", "index": 0, "text": "x"}, "unknown kind 'poem'"),
])
def test_bad_synthetic_input_names_file_and_line(tmp_path, record, message):
    real = write_jsonl(tmp_path / "real.jsonl", REAL)
    syn = write_jsonl(tmp_path / "syn.jsonl", SYNTH + [record])
    with pytest.raises(DataError, match=message) as e:
        pack.pack(real, str(tmp_path / "o"), "sorted", [syn], G=2, log=lambda *a: None)
    assert f"syn.jsonl:{len(SYNTH) + 1}" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["real.jsonl", "syn.jsonl"]


def test_latent_cut_outside_document(tmp_path):
    real = write_jsonl(tmp_path / "real.jsonl", REAL)
    syn = write_jsonl(tmp_path / "syn.jsonl", [dict(SYNTH[-1], cut_char=500)])
    with pytest.raises(DataError, match=r"real.jsonl:1: a latent thought of 'a' cuts at \[500\]"):
        pack.pack(real, str(tmp_path / "o"), "latent", [syn], G=2, log=lambda *a: None)


def test_corrupt_token_files_refused(tmp_path, corpus):
    prefix = str(tmp_path / "real")
    pack.pack(corpus[0], prefix, log=lambda *a: None)
    good_bin, good_idx = open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()
    cases = [
        (good_bin[:-2], good_idx, "truncated or corrupt: header says"),
        (b"NOTMAGIC" + good_bin[8:], good_idx, "bad magic"),
        (good_bin, good_idx[:-5], "header says 3 documents"),
        (good_bin[:64] + good_bin[66:] + b"\x00\x00", good_idx, "not on a BOS token"),
    ]
    for bin_bytes, idx_bytes, message in cases:
        open(prefix + ".bin", "wb").write(bin_bytes)
        open(prefix + ".idx", "wb").write(idx_bytes)
        with pytest.raises(DataError, match=message):
            TokenFile(prefix)
    with pytest.raises(DataError, match="no such token file"):
        TokenFile(str(tmp_path / "missing"))


def test_llama3_shaped_ranks_file(tmp_path):
    # a 128,000-rank file gets Llama 3's 256 special tokens and pattern; BOS is <|begin_of_text|>
    import base64
    ranks = [bytes([i]) for i in range(256)] + [b"\x00\x01" + i.to_bytes(3, "little") for i in range(128000 - 256)]
    with open(tmp_path / "tokenizer.model", "wb") as f:
        f.writelines(base64.b64encode(tok) + b" %d\n" % r for r, tok in enumerate(ranks))
    enc, bos = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert bos == 128000 and enc.n_vocab == 128256
    assert enc.encode("<|end_of_text|><|eot_id|><|reserved_special_token_247|>", allowed_special="all") == [128001, 128009, 128255]
    assert enc.encode_ordinary("ab 12345") == [97, 98, 32, 49, 50, 51, 52, 53]
    assert pack.token_dtype(enc.n_vocab) == np.uint32


# -----------------------------------------------------------------------------
# the command line and clean failures

def snapshot(folder):
    """Every file under `folder` (recursively) and its bytes."""
    return {os.path.relpath(p, folder): open(p, "rb").read()
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


@pytest.fixture
def old_pack(tmp_path, corpus):
    """A complete token file at tmp_path/out/o (that a failed re-pack must leave as it is)."""
    pack.pack(corpus[0], str(tmp_path / "out" / "o"), log=lambda *a: None)
    return str(tmp_path / "out" / "o"), snapshot(tmp_path / "out")


def test_read_jsonl_names_the_line_that_is_not_utf8(tmp_path):
    # a first line longer than text mode's 8 KiB decoding block: the bad byte is found on line 3 exactly
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"id": "a", "text": "x" * 20000}).encode() + b"\n\n" +
                     '{"id": "b", "text": "caf\u00e9"}\n'.encode("latin-1") + b'{"id": "c", "text": "d"}\n')
    lines = []
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8 text \(byte 0xe9 at byte 25 of the line\)"):
        for lineno, _ in read_jsonl(str(path)):
            lines.append(lineno)
    assert lines == [1]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt, TypeError])
def test_failure_while_writing_leaves_no_trace(tmp_path, corpus, old_pack, monkeypatch, failure):
    # windows_with_repeated_source runs inside the TokenWriter block, once every document is written;
    # TypeError: it returns a summary that is not JSON, which fails when OUT.json is written, after
    # OUT.bin and OUT.idx are complete
    def broken(*args):
        if failure is TypeError:
            return object()
        raise failure
    monkeypatch.setattr(pack, "windows_with_repeated_source", broken)
    with pytest.raises(failure):
        pack.pack(corpus[0], old_pack[0], "sorted", [corpus[1]], G=2, log=lambda *a: None)
    assert snapshot(tmp_path / "out") == old_pack[1]
    with pytest.raises(failure):   # and with no token file there before
        pack.pack(corpus[0], str(tmp_path / "new" / "o"), "sorted", [corpus[1]], G=2, log=lambda *a: None)
    assert os.listdir(tmp_path / "new") == []


def cli(*args, wait=True):
    """python pack.py ARGS in a subprocess: the CompletedProcess, or the Popen with wait=False."""
    cmd = [sys.executable, os.path.join(ROOT, "pack.py"), *map(str, args)]
    if not wait:   # to be interrupted: Ctrl-C's default action even where this test runs with it ignored
        # (a background job of a shell without job control), which the child would inherit
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_packs_with_every_flag(tmp_path, corpus):
    r = cli("--real", corpus[0], "--synthetic", corpus[1], "--mode", "sorted", "--G", 2, "--real_position", "front",
            "--synthetic_kind", "rephrase", "--keep_truncated", "--seed", 3, "--tokenizer", "gpt2",
            "--block_size", 16, "--threads", 1, "--out_prefix", tmp_path / "out" / "s")
    assert r.returncode == 0 and r.stderr.startswith("warning: ") and r.stderr.count("\n") == 1, r.stderr  # z's record
    assert "windows of block_size 16 holding 2+ documents of one source" in r.stdout
    meta = TokenFile(str(tmp_path / "out" / "s")).meta
    assert meta["block_size"] == 16 and "context" not in meta
    assert (meta["mode"], meta["G"], meta["real_position"], meta["seed"]) == ("sorted", 2, "front", 3)
    assert meta["per_kind"]["rephrase"]["documents"] == 4   # A0, A1, B0 and the truncated B1
    assert meta["windows with 2+ documents of one source"] > 0


def test_cli_bad_input_is_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    r = cli("--real", path, "--out_prefix", tmp_path / "o")
    assert_error(r.returncode, r.stderr, f"{path}:1:")


def test_synthetic_records_of_no_real_document(tmp_path, corpus):
    # none of the records belongs to a real document, or none is of the kind asked for: an error, not
    # a "sorted" stream of real documents only
    others = write_jsonl(tmp_path / "others.jsonl", [{"id": "x", "text": "Xray."}, {"id": "y", "text": "Yankee."}])
    latent_only = write_jsonl(tmp_path / "latent_only.jsonl", SYNTH[-2:])
    for real, syn, mode in ((others, corpus[1], "sorted"), (corpus[0], latent_only, "shuffled")):
        r = cli("--real", real, "--synthetic", syn, "--mode", mode, "--G", 2, "--out_prefix", tmp_path / "new" / "o")
        assert_error(r.returncode, r.stderr, f"--synthetic {syn}")
        assert not glob.glob(str(tmp_path / "new" / "*"))   # no token file, no temporary file
    # some do not (z's): one warning line with the counts and the first such record, and the stream is made
    r = cli("--real", corpus[0], "--synthetic", corpus[1], "--mode", "sorted", "--G", 2, "--out_prefix", tmp_path / "s")
    assert r.returncode == 0 and r.stderr.startswith("warning: ") and r.stderr.count("\n") == 1, r.stderr
    assert "1 of 4 " in r.stderr and f"{corpus[1]}:6" in r.stderr and corpus[0] in r.stderr


def sample_records(n_chars):
    """Texts of the sample data, repeated until they hold n_chars characters."""
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "sample_data", "train.jsonl"), encoding="utf-8")]
    out, total = [], 0
    while total < n_chars:
        r = rows[len(out) % len(rows)]
        out.append({"id": f"{r['id']}#{len(out)}", "text": r["text"]})
        total += len(r["text"])
    return out


def test_records_made_under_other_settings_are_said_to_be(tmp_path, corpus):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [dict(r, model="m1" if r["source_id"] == "a" else "m2", seed=0)
                                                   for r in SYNTH])
    r = cli("--real", corpus[0], "--synthetic", mixed, "--mode", "sorted", "--G", 2, "--out_prefix", tmp_path / "o")
    warnings = [line for line in r.stderr.splitlines() if "different settings" in line]
    assert r.returncode == 0 and len(warnings) == 1 and warnings[0].startswith("warning: "), r.stderr
    assert "(differing in model;" in warnings[0] and "2, 2 records" in warnings[0]   # a0, a1 | b0, z0


@pytest.mark.parametrize("args,named", [
    (["--block_size", "0"], ["block_size", "0"]),
    (["--block_size", "-5"], ["block_size", "-5"]),
    (["--G", "0"], ["G", "0"]),
    (["--threads", "0"], ["threads", "0"]),
    (["--mode", "sorted"], ["--synthetic"]),
    (["--mode", "sorted", "--synthetic", "SYNTH"], ["--G"]),   # forgetting --G is not a megadoc of one rephrase
    (["--mode", "packed"], ["--mode", "'packed'"]),
    (["--G", "two"], ["--G", "'two'"]),
])
def test_bad_settings_fail_before_any_work(tmp_path, corpus, args, named):
    args = [corpus[1] if a == "SYNTH" else a for a in args]
    r = cli("--real", corpus[0], "--out_prefix", tmp_path / "new" / "o", *args)
    assert_error(r.returncode, r.stderr, *named)
    assert not os.path.exists(tmp_path / "new")   # not even the output folder was made


@pytest.mark.parametrize("kw,message", [
    (dict(block_size=0), "block_size must be >= 1"), (dict(block_size=-1), "block_size must be >= 1"),
    (dict(G=0), "G must be >= 1"), (dict(threads=0), "threads must be >= 1"),
    (dict(synthetic_kind="poem"), "unknown synthetic_kind 'poem'"), (dict(mode="packed"), "unknown mode 'packed'"),
    (dict(real_position="middle"), "unknown real_position 'middle'"), (dict(G=None), "needs --G"),
])
def test_pack_refuses_bad_settings(tmp_path, corpus, kw, message):
    kw = {"mode": "sorted", "G": 2, **kw}
    with pytest.raises(ValueError, match=message):
        pack.pack(corpus[0], str(tmp_path / "new" / "o"), synthetic=[corpus[1]], log=lambda *a: None, **kw)
    assert not os.path.exists(tmp_path / "new")


def test_out_prefix_must_name_a_file(tmp_path, corpus):
    r = cli("--real", corpus[0], "--out_prefix", str(tmp_path / "new") + os.sep)
    assert_error(r.returncode, r.stderr, str(tmp_path / "new") + os.sep)
    assert not os.path.exists(tmp_path / "new")


def test_file_errors_are_one_line(tmp_path, corpus):
    bad = tmp_path / "latin1.jsonl"   # line 1 is a good real document and a good synthetic record
    bad.write_bytes(json.dumps(SYNTH[0]).encode() + b"\n" + '{"id": "b", "text": "caf\u00e9"}\n'.encode("latin-1"))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    real, syn, out = corpus[0], corpus[1], tmp_path / "o"
    cases = [   # the arguments, and what the error line must name
        (["--real", tmp_path / "nope.jsonl"], [f"--real {tmp_path / 'nope.jsonl'}", "No such file"]),
        (["--real", tmp_path], [f"--real {tmp_path}", "directory"]),
        (["--real", real, "--mode", "sorted", "--G", 2, "--synthetic", tmp_path], [f"--synthetic {tmp_path}"]),
        (["--real", real, "--mode", "sorted", "--G", 2, "--synthetic", syn, tmp_path / "nope.jsonl"],
         [f"--synthetic {tmp_path / 'nope.jsonl'}"]),
        (["--real", bad], [f"{bad}:2:", "UTF-8"]),
        (["--real", real, "--mode", "sorted", "--G", 2, "--synthetic", bad], [f"{bad}:2:", "UTF-8"]),
        (["--real", empty], [empty]),
        (["--real", real, "--tokenizer", tmp_path / "no.tiktoken"], [f"--tokenizer {tmp_path / 'no.tiktoken'}"]),
        (["--real", real, "--tokenizer", tmp_path], [f"--tokenizer {tmp_path}"]),
    ]
    before = snapshot(tmp_path)
    for args, named in cases:
        r = cli(*args, "--out_prefix", out)
        assert_error(r.returncode, r.stderr, *named)
        assert snapshot(tmp_path) == before, args
    # an output folder that cannot be made
    r = cli("--real", real, "--out_prefix", bad / "sub" / "o")
    assert_error(r.returncode, r.stderr, bad / "sub")
    assert snapshot(tmp_path) == before


def test_malformed_line_late_in_synthetic_leaves_no_trace(tmp_path, corpus, old_pack):
    # 6M characters: a batch is being tokenized by the worker threads when the bad line is read
    records = [{"id": r["id"] + "/rephrase/0", "source_id": r["id"], "kind": "rephrase", "index": 0, "text": r["text"]}
               for r in sample_records(6e6)]
    syn = write_jsonl(tmp_path / "big.jsonl", records + ['{"id": "late", "text": '])
    r = cli("--real", corpus[0], "--synthetic", syn, "--mode", "sorted", "--G", 1, "--threads", 2,
            "--out_prefix", old_pack[0])
    assert_error(r.returncode, r.stderr, f"{syn}:{len(records) + 1}:")
    assert snapshot(tmp_path / "out") == old_pack[1]   # no *.tmp, the old token file byte for byte


def test_ctrl_c_while_tokenizing_leaves_no_trace(tmp_path, old_pack):
    real = write_jsonl(tmp_path / "big.jsonl", sample_records(16e6))
    segments = old_pack[0] + ".bin.segments.tmp"
    p = cli("--real", real, "--threads", 2, "--out_prefix", old_pack[0], wait=False)
    deadline = time.time() + 60
    # once the store holds tokens, batches are being tokenized in the worker threads and the main thread
    # waits for them or reads the next one
    while p.poll() is None and not (os.path.exists(segments) and os.path.getsize(segments) > 0):
        assert time.time() < deadline
        time.sleep(0.005)
    assert p.poll() is None, "pack.py finished before it could be interrupted: make the input larger"
    p.send_signal(signal.SIGINT)
    stderr = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and stderr == "interrupted\n", stderr
    assert snapshot(tmp_path / "out") == old_pack[1]
