"""Retrieval tasks longer than the state: seeded generators that need no download.

Every generator has the signature ``fn(n, length, difficulty, seed=0, count=None, filler=None)
-> list[Instance]``:

* ``length`` - the prompt's target length in units of ``count`` (a function text -> int;
  default: whitespace-separated words). Pass a tokenizer's token count
  (`token_counter(tokenizer)`) to get prompts of about ``length`` tokens, e.g. 4-16x K;
* ``difficulty`` - how many things the prompt asks the reader to keep (below, per task);
* ``filler`` - the text passages are cut from (None: the Gutenberg books outside the
  held-out set; a passage from a seeded random book and position: real prose, never a
  repeated pattern the model could shortcut).

The tasks (RULER-style; Zoology's MQAR):

* ``mqar`` - multi-query associative recall: ``word: NN`` lines filling the whole prompt,
  then ``difficulty`` queries of distinct keys, all but the last answered (they show the
  task); the last one is scored;
* ``kv`` - key-value lookup in long filler: a block of ``difficulty`` ``word: NNNN`` lines
  somewhere in the prose, then one key asked;
* ``needles`` - multi-key needle: ``difficulty`` sentences "The special magic number for
  <word> is <NNNN>." scattered in the prose, one asked;
* ``vartrack`` - variable tracking: a chain "VAR A = NNNNN." "VAR B = VAR A." ... of
  ``difficulty`` hops and a distractor chain of the same shape with another value, scattered in
  the prose; the value of the asked chain's last variable is the answer.

The statement that holds the answer always lies in the first half of the prompt (5-50 %
deep), so at least half the prompt separates it from the question: no recency rule keeps it.
Every instance's ``meta`` holds ``evidence`` (the substring holding the answer; it occurs
once), ``source`` (the answer's character span inside the prompt: where a retrieving head
should look) and ``question`` (the prompt's tail after the material to be searched).
`encode` tokenizes an instance as the scorer (`retrieval.py`), the layer probe (`hybrid.py`)
and the training rows (`retrieval_data.py`) all read it.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

# Common English nouns: the keys of associative recall (all distinct, lower case).
KEY_WORDS = (
    "apple river chair horse cloud stone bread candle garden window mirror button forest "
    "pencil rabbit engine castle island ladder basket bottle camera carpet cheese coffee "
    "copper dragon feather finger flower guitar hammer helmet jacket kettle lemon magnet "
    "marble monkey needle orange pepper pillow planet pocket potato puzzle rocket saddle "
    "salmon silver spider spoon summer tiger tomato tunnel turtle velvet violin wallet "
    "wheel winter wizard yellow anchor banana barrel beetle blanket bridge cabbage canyon "
    "carrot cherry circle cotton desert dinner doctor falcon farmer glove harbor jungle "
    "lantern meadow mountain napkin ocean parrot pirate rainbow ribbon sailor shadow "
    "shovel sister soldier temple thunder ticket tower valley wagon whistle"
).split()


@dataclass
class Instance:
    """One retrieval question: the model sees ``prompt`` and must continue with ``answer``."""

    task: str  # a name of `TASKS`, or any label (e.g. "custom" in the tests)
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)


# More distinct nouns for long MQAR lists (KEY_WORDS holds the first ones).
_MORE_WORDS = (
    "acorn album arrow badge bamboo beacon bishop blossom bucket cactus canvas captain carrot cavern "
    "cellar chimney cinema clover cobalt comet compass cookie cradle crystal cushion dagger daisy dolphin "
    "donkey eagle emerald fabric fiddle forge fossil fountain galaxy garlic giraffe goblin granite "
    "hammock hazel hedge honey insect ivory jaguar jasmine jewel kitten koala ladle lagoon leopard "
    "lizard lobster locket maple meteor mitten moose muffin nectar nickel noodle oyster paddle panther "
    "pearl pebble pelican piano pickle pigeon pistol plum poppy pumpkin quartz quiver radish raven "
    "saucer scarf sheriff sparrow squirrel statue sugar sword tablet teapot thimble thistle trumpet "
    "tulip umbrella vessel walnut weasel willow zebra"
).split()
KEY_POOL = tuple(dict.fromkeys(KEY_WORDS + _MORE_WORDS))

MQAR_HEADER = "Remember the number that goes with each word.\n\n"
KV_INTRO = "Here is a list of codes:\n"
KV_QUESTION = "\n\nWhat is the code of {key} in the list above?\n{key}: "
NEEDLE_SENTENCE = "The special magic number for {key} is {value}."
NEEDLES_QUESTION = "\n\nWhat is the special magic number for {key}? The special magic number for {key} is "
VAR_ROOT = "VAR {name} = {value}."
VAR_COPY = "VAR {name} = VAR {prev}."
VAR_QUESTION = "\n\nQuestion: which number does VAR {name} hold? Answer: VAR {name} holds "
DEPTH = (0.05, 0.5)  # where the answer's statement lies (fraction of the prompt)


def words(text: str) -> int:
    """The default length unit: whitespace-separated words."""
    return len(text.split())


def token_counter(tokenizer) -> Callable[[str], int]:
    """Length in the tokenizer's tokens (no special tokens)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- shared pieces
def filler_words(filler: str | None = None) -> tuple[str, list[str]]:
    """(source name, words) of the filler: the given text, else the Gutenberg books outside the
    held-out set concatenated in name order (a passage drawn from them is real prose)."""
    if filler is not None:
        return "given", filler.split()
    return "gutenberg", _book_words()


@functools.lru_cache(maxsize=1)
def _book_words() -> list[str]:
    from .data import DEFAULT_HELDOUT, gutenberg_books, split_books

    train, _ = split_books(gutenberg_books(), DEFAULT_HELDOUT)
    return " ".join(train[name] for name in sorted(train)).split()


def _fit(build: Callable[[int], tuple], length: int, count: Callable[[str], int], start: int,
         low: int = 1) -> tuple:
    """build(size) for the size whose prompt is about ``length`` long (a few secant steps on
    the size; the prompt length grows with it)."""
    size = max(low, start)
    out = build(size)
    for _ in range(4):
        got = count(out[0])
        if got == length:
            break
        fixed = count(build(low)[0]) if size != low else got  # the part that does not scale
        per = max((got - fixed) / max(size - low, 1), 1e-9)
        new = max(low, low + round((length - fixed) / per))
        if new == size:
            break
        size = new
        out = build(size)
    return out


def _sentence_cut(passage: list[str], at: int) -> int:
    """Move a cut back (at most 30 words) to just after a sentence end, so inserts read as
    sentences."""
    for back in range(min(at, 30) + 1):
        if at - back == 0 or passage[at - back - 1].endswith((".", "!", "?")):
            return at - back
    return at


def _insert(passage: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join the passage with each insert (depth fraction, text) placed at a sentence end near its
    depth, in the order of the depths (ties: the order given); returns the text and each insert's
    character offset (in the order given)."""
    order = sorted(range(len(inserts)), key=lambda i: (inserts[i][0], i))
    pieces: list[str] = []
    offsets = [0] * len(inserts)
    pos, last = 0, 0
    for i in order:
        cut = max(last, _sentence_cut(passage, int(inserts[i][0] * len(passage))))
        chunk = " ".join(passage[last:cut])
        if chunk:
            pieces.append(chunk)
            pos += len(chunk) + 1
        offsets[i] = pos
        pieces.append(inserts[i][1])
        pos += len(inserts[i][1]) + 1
        last = cut
    pieces.append(" ".join(passage[last:]))
    return " ".join(p for p in pieces if p), offsets


def _passage(pool: list[str], size: int, start: int) -> list[str]:
    return [pool[(start + j) % len(pool)] for j in range(size)]


def _key_values(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """n distinct keys and n distinct four-digit values (kv, needles)."""
    return rng.sample(KEY_POOL, n), [str(v) for v in rng.sample(range(1000, 10000), n)]


def _check(n: int, length: int, difficulty: int, low: int, name: str) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if difficulty < low:
        raise ValueError(f"{name}: difficulty must be >= {low}, got {difficulty}")


def _instance(task, prompt, answer, evidence_at, evidence, question, meta) -> Instance:
    value_at = evidence_at + evidence.rindex(answer)
    assert prompt[value_at:value_at + len(answer)] == answer and prompt.endswith(question)
    return Instance(task, prompt, answer, {**meta, "evidence": evidence, "source": [value_at, value_at + len(answer)],
                                           "question": question})


# ----------------------------------------------------------------------------- the tasks
def mqar(n: int, length: int = 512, difficulty: int = 4, seed: int = 0, count=words, filler=None) -> list[Instance]:
    """Multi-query associative recall; ``difficulty`` = number of queries (the last is scored).
    The number of ``word: NN`` lines is what fills ``length``."""
    _check(n, length, difficulty, 1, "mqar")
    rng = random.Random(f"mqar-{seed}-{length}-{difficulty}")
    out = []
    for i in range(n):
        keys = rng.sample(KEY_POOL, len(KEY_POOL))
        values = [str(rng.randrange(10, 100)) for _ in keys]
        depth = rng.uniform(*DEPTH)
        demo_draw = [rng.random() for _ in range(difficulty - 1)]

        def build(pairs, keys=keys, values=values, depth=depth, demo_draw=demo_draw):
            pairs = min(pairs, len(KEY_POOL))
            asked = min(int(depth * pairs), pairs - 1)
            others = [j for j in range(pairs) if j != asked]
            demos = list(dict.fromkeys(others[int(r * len(others))] for r in demo_draw))
            body = "".join(f"{keys[j]}: {values[j]}\n" for j in range(pairs))
            queries = "".join(f"{keys[j]}: {values[j]}\n" for j in demos) + f"{keys[asked]}: "
            return f"{MQAR_HEADER}{body}\n{queries}", asked, pairs

        prompt, asked, pairs = _fit(build, length, count, start=length // 3, low=difficulty)
        if count(prompt) < 0.8 * length:
            raise ValueError(f"mqar: {len(KEY_POOL)} distinct keys fill at most {count(prompt)} of the asked length "
                             f"{length}; lower the length")
        evidence = f"\n{keys[asked]}: {values[asked]}\n"
        out.append(_instance("mqar", prompt, values[asked], prompt.index(evidence), evidence, f"{keys[asked]}: ",
                             {"pairs": pairs, "index": asked, "key": keys[asked], "seed": seed, "item": i,
                              "difficulty": difficulty}))
    return out


def kv(n: int, length: int = 512, difficulty: int = 8, seed: int = 0, count=words, filler=None) -> list[Instance]:
    """Key-value lookup in long filler; ``difficulty`` = number of ``word: NNNN`` lines in the
    block hidden in the prose."""
    _check(n, length, difficulty, 1, "kv")
    if difficulty > len(KEY_POOL):
        raise ValueError(f"kv: difficulty must be <= {len(KEY_POOL)}, got {difficulty}")
    source, pool = filler_words(filler)
    rng = random.Random(f"kv-{seed}-{length}-{difficulty}")
    out = []
    for i in range(n):
        keys, values = _key_values(rng, difficulty)
        asked = rng.randrange(difficulty)
        depth, start = rng.uniform(*DEPTH), rng.randrange(len(pool))
        block = KV_INTRO + "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
        question = KV_QUESTION.format(key=keys[asked])

        def build(size, block=block, question=question, depth=depth, start=start):
            text, (at,) = _insert(_passage(pool, size, start), [(depth, block)])
            return text + question, at

        prompt, at = _fit(build, length, count, start=length, low=1)
        evidence = f"\n{keys[asked]}: {values[asked]}\n"
        out.append(_instance("kv", prompt, values[asked], at + block.index(evidence), evidence, question,
                             {"key": keys[asked], "depth": depth, "filler": source, "seed": seed, "item": i,
                              "difficulty": difficulty}))
    return out


def needles(n: int, length: int = 512, difficulty: int = 4, seed: int = 0, count=words,
            filler=None) -> list[Instance]:
    """Multi-key needle in a haystack; ``difficulty`` = number of needles (one asked)."""
    _check(n, length, difficulty, 1, "needles")
    source, pool = filler_words(filler)
    rng = random.Random(f"needles-{seed}-{length}-{difficulty}")
    out = []
    for i in range(n):
        keys, values = _key_values(rng, difficulty)
        depths = [rng.uniform(*DEPTH)] + [rng.uniform(0.05, 0.95) for _ in range(difficulty - 1)]
        start = rng.randrange(len(pool))
        sentences = [NEEDLE_SENTENCE.format(key=k, value=v) for k, v in zip(keys, values)]
        question = NEEDLES_QUESTION.format(key=keys[0])

        def build(size, sentences=sentences, depths=depths, start=start, question=question):
            text, offsets = _insert(_passage(pool, size, start), list(zip(depths, sentences)))
            return text + question, offsets[0]

        prompt, at = _fit(build, length, count, start=length, low=1)
        out.append(_instance("needles", prompt, values[0], at, sentences[0], question,
                             {"key": keys[0], "depth": depths[0], "filler": source, "seed": seed, "item": i,
                              "difficulty": difficulty}))
    return out


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def vartrack(n: int, length: int = 512, difficulty: int = 2, seed: int = 0, count=words,
             filler=None) -> list[Instance]:
    """Variable tracking; ``difficulty`` = hops of the asked chain (1: a plain needle with a
    distractor); a distractor chain of the same length holds another value."""
    _check(n, length, difficulty, 1, "vartrack")
    source, pool = filler_words(filler)
    rng = random.Random(f"vartrack-{seed}-{length}-{difficulty}")
    out = []
    for i in range(n):
        names = []
        while len(names) < 2 * difficulty:
            name = _var_name(rng)
            if name not in names:
                names.append(name)
        chains = [names[:difficulty], names[difficulty:]]
        values = [str(v) for v in rng.sample(range(10000, 100000), 2)]
        statements: list[tuple[float, str]] = []
        root = rng.uniform(*DEPTH)  # the asked chain's root (the answer) in the first half
        depths = [[root] + sorted(rng.uniform(root, 0.95) for _ in range(difficulty - 1)),
                  sorted(rng.uniform(0.05, 0.95) for _ in range(difficulty))]
        for chain, value, ds in zip(chains, values, depths):
            for h, (d, name) in enumerate(zip(ds, chain)):
                text = VAR_ROOT.format(name=name, value=value) if h == 0 else VAR_COPY.format(name=name,
                                                                                             prev=chain[h - 1])
                statements.append((d, text))
        start = rng.randrange(len(pool))
        question = VAR_QUESTION.format(name=chains[0][-1])

        def build(size, statements=statements, start=start, question=question):
            text, offsets = _insert(_passage(pool, size, start), statements)
            return text + question, offsets[0]

        prompt, at = _fit(build, length, count, start=length, low=1)
        root = statements[0][1]
        out.append(_instance("vartrack", prompt, values[0], at, root, question,
                             {"chain": chains[0], "distractor": chains[1], "filler": source, "seed": seed,
                              "item": i, "difficulty": difficulty}))
    return out


TASKS: dict[str, Callable[..., list[Instance]]] = {"mqar": mqar, "kv": kv, "needles": needles,
                                                   "vartrack": vartrack}
DEFAULT_DIFFICULTY = {"mqar": 4, "kv": 16, "needles": 4, "vartrack": 2}


def make_task(task: str, n: int, length: int, difficulty: int | None = None, seed: int = 0, tokenizer=None,
              filler: str | None = None) -> list[Instance]:
    """``n`` instances of a named task (`TASKS`), ``length`` in the tokenizer's tokens when one is
    given (else words)."""
    if task not in TASKS:
        raise ValueError(f"retrieval task {task!r} unknown; allowed: {', '.join(TASKS)}")
    count = words if tokenizer is None else token_counter(tokenizer)
    diff = DEFAULT_DIFFICULTY[task] if difficulty is None else difficulty
    return TASKS[task](n, length, diff, seed=seed, count=count, filler=filler)


@dataclass
class Encoded:
    ids: list[int]  # prompt + answer, tokenized as one text
    answer_start: int  # index of the first answer token
    evidence_end: int  # index just after the statement that holds the answer (the prompt's end if unknown)


def encode(instance: Instance, tokenizer) -> Encoded:
    """Tokenize prompt + answer as one text (the tokenizer's default settings, special tokens
    included) and locate the answer and the end of ``meta["evidence"]``."""
    prompt = instance.prompt
    text = prompt + instance.answer
    evidence = instance.meta.get("evidence")
    evidence_char = prompt.index(evidence) + len(evidence) if evidence and evidence in prompt else len(prompt)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        # a token straddling the prompt/answer boundary counts as an answer token
        start = next(i for i, (a, b) in enumerate(offsets) if b > len(prompt) and b > a)
        evidence_end = next((i for i, (a, b) in enumerate(offsets) if b > evidence_char and b > a), len(ids))
    except (NotImplementedError, StopIteration, KeyError, TypeError, ValueError):  # slow tokenizers
        head = tokenizer(prompt)["input_ids"]
        ids = list(head) + tokenizer(instance.answer, add_special_tokens=False)["input_ids"]
        start = len(head)
        evidence_end = len(tokenizer(prompt[:evidence_char])["input_ids"])
    if start >= len(ids):
        raise ValueError(f"the answer {instance.answer!r} has no tokens")
    return Encoded(ids, start, evidence_end)


def answer_is_unique(inst: Instance) -> bool:
    """The answer is determined: its evidence occurs once, and (per task) the asked key/name is
    bound once in the searched material."""
    p, m = inst.prompt, inst.meta
    if p.count(m["evidence"]) != 1:
        return False
    body = p[:len(p) - len(m["question"])]
    if inst.task in ("mqar", "kv"):
        return len(re.findall(rf"(?m)^{re.escape(m['key'])}: \d+$", body)) == 1
    if inst.task == "needles":
        return body.count(f"The special magic number for {m['key']} is ") == 1
    if inst.task == "vartrack":
        return all(body.count(f"VAR {name} = ") == 1 for name in m["chain"])
    return True
