"""A synthetic stand-in for One Billion Word, written in the same raw release layout.

No text comes from the real corpus. Sentences come from a small probabilistic grammar over
invented words built from syllables (a few thousand word types), with structure a language
model can learn step by step:

* local rules: ``a``/``an`` before a vowel, plural ``-s``/``-es``, verb endings;
* subject-verb agreement, also across a relative clause (``the X that eats the Ys runs``);
* topics: each sentence draws its nouns, verbs and adjectives from one topic, and each
  verb selects objects from its topic, so the wider context narrows the next word;
* long-range pairs: a question's first word decides the final ``?``, an opening quote
  needs its closing quote, an apposition's commas come in pairs;
* numbers, years, money and percentages as space-separated tokens, Zipf-like word
  frequencies.

A small model's loss falls within tens of steps from the local rules; the agreement and
topic structure reward depth and context. Output is deterministic given the arguments:
shard ``i`` depends only on (seed, split, i, sentence count).

CLI: ``python -m ds_interlock.data.sample --out DIR [--train_shards N --sentences_per_shard N]``
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
from pathlib import Path

from .cache import atomic_write_bytes, atomic_write_json
from .raw import (HELDOUT_DIR, HELDOUT_SHARDS, RELEASE_DIR, TRAIN_DIR, TRAIN_SHARDS,
                  heldout_shard_name, train_shard_name)

GENERATOR_VERSION = 1

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "tr", "kl", "st", "sh", "ch", "gr", "pl", "dr", "fl", ""]
_VOWELS = ["a", "e", "i", "o", "u", "a", "o", "ai", "ou", "ea"]
_CODAS = ["", "", "", "n", "r", "l", "m", "k", "nd", "st", "rt"]
_FUNCTION = {"the", "a", "an", "this", "every", "these", "those", "some", "many", "that", "who",
             "and", "but", "or", "of", "in", "on", "at", "for", "to", "from", "with", "by", "is", "are",
             "was", "were", "has", "have", "had", "will", "does", "do", "did", "not", "said", "says",
             "last", "next", "year", "years", "week", "percent", "million", "billion", "its", "their"}
_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "dozens of"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_VOWEL_START = tuple("aeiou")


class _Choice:
    """Zipf-weighted choice from a fixed list (rank r has weight 1 / (r + 2))."""

    def __init__(self, items, alpha: float = 1.0):
        self.items = list(items)
        self.cum = list(itertools.accumulate(1.0 / (r + 2) ** alpha for r in range(len(self.items))))

    def __call__(self, rng: random.Random):
        return self.items[bisect.bisect_left(self.cum, rng.random() * self.cum[-1])]


def _plural(stem: str) -> str:
    return stem + "es" if stem.endswith(("s", "sh", "ch", "z")) else stem + "s"


def _past(stem: str) -> str:
    return stem + "d" if stem.endswith("e") else stem + "ed"


def _ing(stem: str) -> str:
    return (stem[:-1] if stem.endswith("e") and len(stem) > 2 else stem) + "ing"


class Lexicon:
    """Invented words grouped by topic and part of speech, fixed by the seed."""

    def __init__(self, seed: int = 0, num_topics: int = 10, agents_per_topic: int = 40,
                 things_per_topic: int = 110, verbs_per_topic: int = 45,
                 intransitive_per_topic: int = 15, adjectives_per_topic: int = 35,
                 num_names: int = 250, num_places: int = 120, num_adverbs: int = 60):
        rng = random.Random(f"ds_interlock-lexicon-{seed}")
        used: set[str] = set(_FUNCTION)

        def fresh(min_syl: int, max_syl: int) -> str:
            while True:
                w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                            for _ in range(rng.randint(min_syl, max_syl)))
                forms = {w, _plural(w), _past(w), _ing(w)}
                if len(w) >= 3 and not forms & used:
                    used.update(forms)
                    return w

        self.topics = []
        for _ in range(num_topics):
            self.topics.append({
                "agent": _Choice([fresh(1, 3) for _ in range(agents_per_topic)]),
                "thing": _Choice([fresh(1, 3) for _ in range(things_per_topic)]),
                "verb": _Choice([fresh(1, 2) for _ in range(verbs_per_topic)]),
                "intrans": _Choice([fresh(1, 2) for _ in range(intransitive_per_topic)]),
                "adj": _Choice([fresh(1, 3) for _ in range(adjectives_per_topic)]),
            })
        self.topic = _Choice(range(num_topics), alpha=0.5)
        self.names = _Choice([fresh(2, 3).capitalize() for _ in range(num_names)])
        self.places = _Choice([fresh(2, 3).capitalize() for _ in range(num_places)])
        self.adverbs = _Choice([fresh(2, 3) + "ly" for _ in range(num_adverbs)])

    def word_types(self) -> set[str]:
        """Every surface form the grammar can emit from the invented words."""
        out = set()
        for t in self.topics:
            for n in t["agent"].items + t["thing"].items:
                out.update((n, _plural(n)))
            for v in t["verb"].items + t["intrans"].items:
                out.update((v, _plural(v), _past(v), _ing(v)))
            out.update(t["adj"].items)
        out.update(self.names.items + self.places.items + self.adverbs.items)
        return out


class Grammar:
    """Draws sentences (lists of tokens) from a :class:`Lexicon`."""

    OFF_TOPIC = 0.08   # chance that a content word comes from another topic

    def __init__(self, lexicon: Lexicon):
        self.lex = lexicon

    # -- words ---------------------------------------------------------------
    def _word(self, rng, topic, kind):
        if rng.random() < self.OFF_TOPIC:
            topic = rng.randrange(len(self.lex.topics))
        return self.lex.topics[topic][kind](rng)

    def _number(self, rng) -> str:
        r = rng.random()
        if r < 0.4:
            return str(rng.randint(2, 99))
        if r < 0.7:
            return f"{rng.randint(1, 9)},{rng.randint(0, 999):03d}"
        return f"{rng.randint(1, 99)}.{rng.randint(1, 9)}"

    def _year(self, rng) -> str:
        return str(rng.randint(1950, 2012))

    # -- phrases -------------------------------------------------------------
    def noun_phrase(self, rng, topic, kind, plural, allow_name=True):
        if kind == "agent" and not plural and allow_name and rng.random() < 0.25:
            return [self.lex.names(rng)]
        noun = self._word(rng, topic, kind)
        adjs = [self._word(rng, topic, "adj") for _ in range(rng.choice((0, 0, 0, 1, 1, 2)))]
        if plural:
            det = rng.choice(["the", "the", "these", "those", "some", "many", "NUMWORD", "NUM"])
            if det == "NUMWORD":
                det = rng.choice(_NUMBER_WORDS)
            elif det == "NUM":
                det = self._number(rng)
            return det.split() + adjs + [_plural(noun)]
        det = rng.choice(["the", "the", "the", "a", "a", "this", "every"])
        if det == "a" and (adjs or [noun])[0].startswith(_VOWEL_START):
            det = "an"
        return [det] + adjs + [noun]

    def verb_phrase(self, rng, topic, plural, tense=None):
        tense = tense or rng.choice(["present", "present", "past", "past", "future",
                                     "progressive", "perfect"])
        transitive = rng.random() < 0.75
        verb = self._word(rng, topic, "verb" if transitive else "intrans")
        if tense == "present":
            words = [verb if plural else _plural(verb)]
        elif tense == "past":
            words = [_past(verb)]
        elif tense == "future":
            words = ["will", verb]
        elif tense == "progressive":
            words = ["are" if plural else "is", _ing(verb)]
        else:
            words = ["have" if plural else "has", _past(verb)]
        if rng.random() < 0.15:
            words.insert(len(words) - 1, self.lex.adverbs(rng))
        if transitive:
            words += self.noun_phrase(rng, topic, "thing", rng.random() < 0.4)
        words += self.modifier(rng, topic)
        return words

    def modifier(self, rng, topic):
        r = rng.random()
        if r < 0.15:
            return ["in", self.lex.places(rng)]
        if r < 0.22:
            return ["in", self._year(rng)]
        if r < 0.28:
            return ["on", rng.choice(_DAYS)]
        if r < 0.33:
            n = rng.randint(1, 12)
            return ["for", str(n), "year" if n == 1 else "years"]
        if r < 0.40:
            return ["with", *self.noun_phrase(rng, topic, "thing", rng.random() < 0.5)]
        return []

    def subject(self, rng, topic, plural):
        words = self.noun_phrase(rng, topic, "agent", plural)
        if len(words) > 1 and rng.random() < 0.2:
            words += ["from", self.lex.places(rng)]
        return words

    # -- sentences -----------------------------------------------------------
    def clause(self, rng, topic):
        plural = rng.random() < 0.4
        return self.subject(rng, topic, plural) + self.verb_phrase(rng, topic, plural)

    def sentence(self, rng) -> list[str]:
        topic = self.lex.topic(rng)
        plural = rng.random() < 0.4
        r = rng.random()
        if r < 0.30:                                   # plain clause
            words = self.clause(rng, topic) + ["."]
        elif r < 0.40:                                 # fronted time
            when = rng.choice([["on", rng.choice(_DAYS)], ["in", self._year(rng)],
                               ["last", rng.choice(["week", "year"])]])
            words = when + [","] + self.clause(rng, topic) + ["."]
        elif r < 0.55:                                 # relative clause; main verb agrees with head
            head = self.noun_phrase(rng, topic, "agent", plural, allow_name=False)
            if rng.random() < 0.5:
                rel = ["that" if rng.random() < 0.5 else "who"] + self.verb_phrase(rng, topic, plural)
            else:
                inner_pl = rng.random() < 0.5
                inner = self.noun_phrase(rng, topic, "agent", inner_pl, allow_name=False)
                verb = self._word(rng, topic, "verb")
                rel = ["that"] + inner + [verb if inner_pl else _plural(verb)]
            words = head + rel + self.verb_phrase(rng, topic, plural, "present") + ["."]
        elif r < 0.65:                                 # question: first word decides '?'
            aux = rng.choice(["do", "did", "will"])
            if aux == "do" and not plural:
                aux = "does"
            verb = self._word(rng, topic, "verb")
            words = [aux.capitalize()] + self.subject(rng, topic, plural) + [verb] + \
                self.noun_phrase(rng, topic, "thing", rng.random() < 0.4) + self.modifier(rng, topic) + ["?"]
        elif r < 0.77:                                 # quotation: paired quotes
            speaker = self.lex.names(rng)
            if rng.random() < 0.6:
                words = ['"'] + self.clause(rng, topic) + [",", '"', "said", speaker, "."]
            else:
                words = [speaker, "said", "that"] + self.clause(rng, topic) + ["."]
        elif r < 0.85:                                 # coordination: both verbs agree
            words = self.subject(rng, topic, plural) + self.verb_phrase(rng, topic, plural) + \
                ["and"] + self.verb_phrase(rng, topic, plural) + ["."]
        elif r < 0.93:                                 # apposition: paired commas
            name = self.lex.names(rng)
            appos = self.noun_phrase(rng, topic, "agent", False, allow_name=False)
            words = [name, ","] + appos + ["from", self.lex.places(rng), ","] + \
                self.verb_phrase(rng, topic, False) + ["."]
        else:                                          # figures
            thing = self._word(rng, topic, "thing")
            amount = ["$", self._number(rng), rng.choice(["million", "billion"])]
            words = [self.lex.names(rng), "'s", _plural(thing), rng.choice(["rose", "fell"]),
                     str(rng.randint(1, 40)), "percent", "to"] + amount + ["in", self._year(rng), "."]
        first = 1 if words[0] == '"' else 0
        words[first] = words[first][0].upper() + words[first][1:]
        return words


def generate_sentences(num: int, seed: int = 0, stream: str = "train", lexicon: Lexicon | None = None):
    """``num`` sentences (strings) of the named stream; the same arguments give the same text."""
    grammar = Grammar(lexicon or Lexicon(seed))
    rng = random.Random(f"ds_interlock-sample-{seed}-{stream}")
    for _ in range(num):
        yield " ".join(grammar.sentence(rng))


def _write_shard(path: Path, sentences) -> None:
    atomic_write_bytes(path, "".join(s + "\n" for s in sentences).encode("utf-8"))


def write_sample_corpus(root: str | os.PathLike, num_train_shards: int = 4,
                        sentences_per_shard: int = 10_000, seed: int = 0, *,
                        num_heldout_shards: int = 1,
                        heldout_sentences_per_shard: int | None = None) -> Path:
    """Write a synthetic corpus in the raw One Billion Word layout under ``root``.

    Train shards are ``news.en-00001-of-00100`` onwards, held-out shards
    ``news.en.heldout-00000-of-00050`` onwards (shard 00000 is the test set).
    ``heldout_sentences_per_shard`` defaults to a fifth of ``sentences_per_shard`` (at
    least 100). The defaults give about 3 MB. Returns the release directory.
    """
    if not 1 <= num_train_shards <= len(TRAIN_SHARDS):
        raise ValueError(f"num_train_shards must be in 1..{len(TRAIN_SHARDS)}")
    if not 1 <= num_heldout_shards <= len(HELDOUT_SHARDS):
        raise ValueError(f"num_heldout_shards must be in 1..{len(HELDOUT_SHARDS)}")
    if heldout_sentences_per_shard is None:
        heldout_sentences_per_shard = max(100, sentences_per_shard // 5)
    release = Path(root) / RELEASE_DIR
    marker = release / "SYNTHETIC_SAMPLE.json"
    old_shards = [p for d in (TRAIN_DIR, HELDOUT_DIR) if (release / d).is_dir()
                  for p in (release / d).iterdir() if p.name.startswith("news.en")]
    if old_shards and not marker.is_file():
        # Never overwrite what may be the real corpus.
        raise FileExistsError(f"{release} already holds shards that this generator did not write")
    for p in old_shards:   # a rewrite with fewer shards must not leave stale ones behind
        p.unlink()
    lexicon = Lexicon(seed)
    for k, i in enumerate(TRAIN_SHARDS[:num_train_shards]):
        _write_shard(release / TRAIN_DIR / train_shard_name(i),
                     generate_sentences(sentences_per_shard, seed, f"train-{i}", lexicon))
    for i in HELDOUT_SHARDS[:num_heldout_shards]:
        _write_shard(release / HELDOUT_DIR / heldout_shard_name(i),
                     generate_sentences(heldout_sentences_per_shard, seed, f"heldout-{i}", lexicon))
    atomic_write_json(release / "SYNTHETIC_SAMPLE.json", {
        "generator": "ds_interlock.data.sample", "version": GENERATOR_VERSION, "seed": seed,
        "num_train_shards": num_train_shards, "sentences_per_shard": sentences_per_shard,
        "num_heldout_shards": num_heldout_shards,
        "heldout_sentences_per_shard": heldout_sentences_per_shard})
    return release


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic corpus in the One Billion Word raw layout.")
    ap.add_argument("--out", required=True, help="directory to create the release directory in")
    ap.add_argument("--train_shards", type=int, default=4)
    ap.add_argument("--sentences_per_shard", type=int, default=10_000)
    ap.add_argument("--heldout_shards", type=int, default=1)
    ap.add_argument("--heldout_sentences", type=int, default=None,
                    help="sentences per held-out shard (default: sentences_per_shard / 5)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    release = write_sample_corpus(a.out, a.train_shards, a.sentences_per_shard, a.seed,
                                  num_heldout_shards=a.heldout_shards,
                                  heldout_sentences_per_shard=a.heldout_sentences)
    size = sum(f.stat().st_size for f in release.rglob("news.en*"))
    print(f"wrote {release} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
