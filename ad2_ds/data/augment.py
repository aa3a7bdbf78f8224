"""Text-editing data augmentation, the baseline AD² is measured against: WordNet synonym replacement, ×N copies.

    wordnet = WordNet("/usr/share/wordnet")        # WordNet 3.0's database (Debian/Ubuntu: apt install wordnet-base)
    train = augment_dataset(train, wordnet, copies=8, alpha=0.1, seed=0)  # the originals, then 8 edited copies of each
    # or from the recipe: distill_glue.py --method kd --augment_copies 8 --augment_alpha 0.1

This is EDA's synonym replacement (Wei & Zou, 2019) used the way TinyBERT (Jiao et al., 2020) uses its augmentation:
every training example gets ``copies`` edited copies, and the student distils from the teacher on all of them. In each
copy, ``n = max(1, int(alpha * words))`` of the words that are not stop words and have WordNet synonyms (drawn
without replacement; all of them if fewer) are each replaced by one of their synonyms, drawn uniformly: EDA's rule,
so a copy differs from its original whenever the sentence has a word to replace (a per-word coin, TinyBERT's rule,
leaves ~45% of the copies identical at 10% on short sentences). A copy keeps its original's label (EDA's
convention); the KD term then pulls it to the teacher's soft label for the edited text.

Each copy is a pure function of ``(seed, idx, copy)``: the same arguments give the same data on every rank and in every
run, and copy ``k`` of the example with id ``i`` gets the id ``i + k * stride`` (``stride`` = the largest id + 1), so
the ids stay unique and a teacher cache can be keyed by them.

The WordNet reader is ours because nltk's reader does not open a system folder (it wants ``nltk_data`` and
``lexnames``); it reads the documented database format (wndb(5WN)): ``index.POS`` maps a lemma to its synset
offsets, ``data.POS`` holds each synset's words at that byte offset, ``POS.exc`` lists irregular forms, and the
regular inflections are detached by WordNet's own morphy rules.
"""

import hashlib
import os
import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np

POS = ("noun", "verb", "adj", "adv")
# WordNet's morphy suffix rules (wnintro(3WN), "morphy"): inflected suffix -> base suffix, per part of speech.
_DETACH = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}  # fmt: skip
# A whole alphabetic word, not part of a token with digits, underscores, apostrophes or hyphens ("century's",
# "21st", "movie-like").
_WORD = re.compile(r"(?<![\w'-])[A-Za-z]+(?![\w'-])")


def default_wordnet_dir() -> str:
    return os.environ.get("WORDNET_DIR", "/usr/share/wordnet")


def missing_wordnet_files(path: str) -> List[str]:
    """The database files :class:`WordNet` needs that ``path`` lacks (empty when it can be read)."""
    need = [f"{kind}.{pos}" for pos in POS for kind in ("index", "data")]
    return [f for f in need if not os.path.isfile(os.path.join(path, f))]


class WordNet:
    """Synonyms from a WordNet 3.0 database folder. ``synonyms(word)`` is the list of the other lemmas of every synset
    of every base form of ``word`` (all parts of speech), in WordNet's sense order, without repeats."""

    def __init__(self, path: str):
        missing = missing_wordnet_files(path)
        if missing:
            raise FileNotFoundError(
                f"WordNet: {path} lacks {', '.join(missing)}: install WordNet 3.0 (Debian/Ubuntu: apt install "
                "wordnet-base) or point WORDNET_DIR / --wordnet_dir at its dict folder"
            )
        self.path = path
        self.index: Dict[str, Dict[str, Tuple[int, ...]]] = {pos: {} for pos in POS}
        self.exceptions: Dict[str, Dict[str, Tuple[str, ...]]] = {pos: {} for pos in POS}
        for pos in POS:
            with open(os.path.join(path, f"index.{pos}"), encoding="utf-8") as f:
                for line in f:
                    if line.startswith(" "):  # the licence header
                        continue
                    # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt offset*synset_cnt
                    fields = line.split()
                    n_synsets, n_pointers = int(fields[2]), int(fields[3])
                    offsets = fields[4 + n_pointers + 2 :][:n_synsets]
                    self.index[pos][fields[0]] = tuple(int(o) for o in offsets)
            exc = os.path.join(path, f"{pos}.exc")
            if os.path.isfile(exc):
                with open(exc, encoding="utf-8") as f:
                    for line in f:
                        inflected, *bases = line.split()
                        self.exceptions[pos][inflected] = tuple(bases)
        self._data = {pos: open(os.path.join(path, f"data.{pos}"), "rb") for pos in POS}  # noqa: SIM115 (kept open)
        self.synonyms = lru_cache(maxsize=None)(self._synonyms)

    def signature(self) -> str:
        """Which database this is (file names and sizes): part of an augmented dataset's fingerprint."""
        return ",".join(f"data.{pos}:{os.path.getsize(os.path.join(self.path, f'data.{pos}'))}" for pos in POS)

    def base_forms(self, word: str, pos: str) -> List[str]:
        """``word``'s lemmas in ``pos``: itself, its listed irregular bases, its regular detachments in the index."""
        index = self.index[pos]
        forms = [word] if word in index else []
        forms += [b for b in self.exceptions[pos].get(word, ()) if b in index and b not in forms]
        for suffix, base in _DETACH[pos]:
            if word.endswith(suffix) and len(word) > len(suffix):
                candidate = word[: len(word) - len(suffix)] + base
                if candidate in index and candidate not in forms:
                    forms.append(candidate)
        return forms

    def _synset_words(self, pos: str, offset: int) -> List[str]:
        f = self._data[pos]
        f.seek(offset)
        # offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt ...
        fields = f.readline().decode("utf-8").split()
        n_words = int(fields[3], 16)
        words = fields[4 : 4 + 2 * n_words : 2]
        return [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers: "outback(a)"

    def _synonyms(self, word: str) -> Tuple[str, ...]:
        word = word.lower()
        bases, out = set(), []
        for pos in POS:
            for base in self.base_forms(word, pos):
                bases.add(base)
                for offset in self.index[pos][base]:
                    out += self._synset_words(pos, offset)
        seen, result = set(bases) | {word}, []
        for w in out:
            w = w.lower()
            if w not in seen:
                seen.add(w)
                result.append(w.replace("_", " "))
        return tuple(result)

    def close(self):
        for f in self._data.values():
            f.close()


def _stop_words() -> frozenset:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def replace_synonyms(text: str, synonyms, alpha: float, rng: np.random.Generator, stop_words=frozenset()) -> str:
    """``text`` with ``max(1, int(alpha * words))`` of its words that are not in ``stop_words`` and have synonyms
    (``synonyms(word) -> sequence``) each replaced by one drawn uniformly (all such words when there are fewer;
    ``alpha=0`` edits nothing). Spacing and punctuation are kept; so is the case of a capitalised or upper-case
    word."""
    matches = list(_WORD.finditer(text))
    if alpha <= 0 or not matches:
        return text
    eligible = [m for m in matches if m.group(0).lower() not in stop_words and synonyms(m.group(0).lower())]
    n = min(len(eligible), max(1, int(alpha * len(matches))))
    if n == 0:
        return text
    chosen = sorted(rng.choice(len(eligible), size=n, replace=False).tolist())
    out, end = [], 0
    for j in chosen:
        m = eligible[j]
        options = synonyms(m.group(0).lower())
        out += [text[end : m.start()], _match_case(options[int(rng.integers(len(options)))], m.group(0))]
        end = m.end()
    return "".join(out) + text[end:]


def augment_dataset(
    ds: datasets.Dataset,
    wordnet: WordNet,
    copies: int,
    alpha: float,
    seed: int = 0,
    text_columns: Sequence[str] = ("text_a", "text_b"),
    stop_words: Optional[frozenset] = None,
) -> datasets.Dataset:
    """``ds`` followed by ``copies`` synonym-replaced copies of it (same columns; ``idx`` made unique, see the
    module docstring). ``copies=0`` returns ``ds`` unchanged."""
    if copies < 0 or not 0.0 < alpha <= 1.0:
        raise ValueError(f"augment_dataset: copies must be >= 0 and alpha in (0, 1], got {copies} and {alpha}")
    if copies == 0 or len(ds) == 0:
        return ds
    stop_words = _stop_words() if stop_words is None else stop_words
    columns = [c for c in text_columns if c in ds.column_names]
    ids = [int(i) for i in ds["idx"]]
    stride = max(ids) + 1
    parent = getattr(ds, "_fingerprint", None) or hashlib.sha1(repr(ids).encode()).hexdigest()

    def edit_batch(batch, k):
        out = {c: [] for c in columns}
        for j, i in enumerate(batch["idx"]):
            rng = np.random.default_rng([seed, int(i), k])
            for c in columns:
                out[c].append(replace_synonyms(batch[c][j], wordnet.synonyms, alpha, rng, stop_words))
        out["idx"] = [int(i) + k * stride for i in batch["idx"]]
        return out

    parts = [ds]
    for k in range(1, copies + 1):
        key = f"{parent}-synonyms-{wordnet.signature()}-a{alpha}-s{seed}-k{k}-{','.join(columns)}"
        parts.append(
            ds.map(
                edit_batch,
                fn_kwargs={"k": k},
                batched=True,
                new_fingerprint=hashlib.sha1(key.encode()).hexdigest()[:16],
                desc=f"synonym replacement, copy {k}/{copies}",
            )
        )
    return datasets.concatenate_datasets(parts)
