"""PCM-Net's visual concept vocabulary: the high-frequency nouns of the training corpus (Sec. 3.2),
or a fixed list of words (``concepts.source: word_list``), each with the CLIP text feature of its
template sentence(s).

The paper encodes "A photo of {c}"; with several templates the feature is a prompt ensemble, CLIP's
zero-shot recipe: the mean of the unit features of the concept's sentences, renormalised
(``ensemble_features``). The released code reads a pickled (words, features) pair built this way
("..._with_ensemble.pickle"); its words and templates are not in the released source, so a profile
that wants them must list them (``concepts.words``, ``concepts.templates``) with their source.

Where the noun knowledge comes from
-----------------------------------
No part-of-speech tagger with bundled data can be installed here (NLTK's and spaCy's models are
downloaded from GitHub at run time). The word classes come instead from the lexicon that the PyPI
package ``lemminflect`` ships inside its wheel (``lemminflect/resources/lemma_lu.csv.gz``, derived
from the NIH SPECIALIST Lexicon): for every English word form it lists the universal POS tags the
word CAN take (``NOUN``, ``VERB``, ``ADJ``, ...) and the lemma under each. It loads from the
installed package, never from the network.

A lexicon says what a word can be, not what it is in a given sentence ("dog", "water", "running",
"white" are all listed as nouns), so a simple, deterministic context rule decides each occurrence.
Captions are lower-cased and cut into runs of letters ``[a-z]+`` (punctuation and digits split
words and are dropped; "dog's" gives "dog" and "s"). A token is a *noun occurrence* when

1. the lexicon lists ``NOUN`` for it (words the lexicon does not know never count);
2. it is not in ``STOPWORDS`` (function words: determiners, pronouns, prepositions, conjunctions,
   auxiliaries, number words, quantifiers, common adverbs) and has at least 2 letters;
3. *modifier or head*: a word the lexicon also lists as an adjective ("white", "young", "front")
   or the -ing/-ed form of a verb ("running" -> "run", "building" -> "build") counts only as the
   head of a noun phrase: right after a determiner, possessive, number word or adjective, AND
   followed by the end of the caption, a function word other than and/or, or an -ing verb form.
   "a building", "a wooden building", "the front of", "in the dark" count; "a white dog",
   "black and white", "a dark haired", "is running", "a swimming pool" (-> "pool") do not;
4. *verbs*: a word the lexicon also lists as a verb is read as the verb
   (a) right after "to", a modal or a subject pronoun, or right before an article or possessive
       ("to catch", "as he stands", "holds a", "walk their");
   (b) right after a noun occurrence it agrees with in number: an inflected -s form after a
       singular noun, a base form after a plural ("a dog runs", "dogs play" give only "dog").

Each occurrence is counted under its noun lemma (the lexicon's first ``NOUN`` lemma), so "dogs"
and "dog" are one concept, "men" counts as "man" and "children" as "child".

Limits, stated plainly: this is a heuristic, not a tagger; it reads no punctuation and no
sentence structure beyond one word either side. Noun-noun compounds are counted word by word
("tennis ball" gives "tennis" and "ball"); a verb whose subject the rules miss is taken as a noun
("a snowboarder jumps" counts "jump": "snowboarder" is not in the lexicon); rule 3 drops the
adjective-capable nouns that modify a following noun ("dress" in "dress shoes"); out-of-lexicon
words (misspellings, rare words such as "sunglasses") are never concepts; lemmas merge senses
("glasses" counts as "glass", "shorts" as "short"). On the 40,460 Flickr8k captions the top 100
are objects, people, scenes and a few sports words, with a handful of action nouns ("jump",
"race", "trick"); the errors sit in the tail of a vocabulary of a few hundred to a few thousand
words, which is what Eq. 1 retrieves from.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Iterable

import lemminflect
import numpy as np
import pyarrow as pa

from pipeline.data.shards import feature_array

PROMPT_TEMPLATE = "A photo of {}"          # PCM-Net Eq. 1: the template sentence of each concept (the default)

STOPWORDS = frozenset("""
a an the this that these those each every either neither another such what which whose whatever
some any no none all both half many much more most few fewer several lot lots plenty enough other others
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself it its
itself we us our ours ourselves they them their theirs themselves one ones someone somebody something
anyone anybody anything everyone everybody everything nobody nothing somewhere anywhere everywhere
nowhere who whom whoever
about above across after against along alongside amid among amongst around as at atop before behind
below beneath beside besides between beyond by despite down during except for from in inside into
like near nearby next of off on onto opposite out outside over past per round since than through
throughout till to toward towards under underneath unlike until up upon via with within without
and or but nor so yet if then else because although though while whereas whether where when how why
be am is are was were been being have has had having do does did doing done can could may might must
shall should will would ought
not very too also just only even still again ever never always often sometimes almost quite rather
really here there now away back together alone instead
zero two three four five six seven eight nine ten eleven twelve twenty thirty hundred thousand
first second third last
s d ll m re ve
""".split())

DETERMINERS = frozenset("""
a an the this that these those each every another some any no several many few both all
my your his her its our their whose
two three four five six seven eight nine ten
""".split())

CONJUNCTIONS = frozenset({"and", "or"})
PLURAL_WITHOUT_S = frozenset({"people", "police", "cattle"})   # plurals whose lemma is the word itself
OBJECT_CUES = frozenset("a an the his her their its my your our".split())
VERB_CUES = frozenset("to can could may might must shall should will would i you he she it we they who others".split())


@lru_cache(maxsize=None)
def _lexicon():
    """The lemminflect lookup (it loads its bundled lexicon on first use)."""
    return lemminflect.getAllLemmas


@lru_cache(maxsize=200_000)
def readings(word: str) -> dict[str, tuple[str, ...]]:
    """The lexicon's POS -> lemmas for a lower-case word ({} if the lexicon does not know it)."""
    return dict(_lexicon()(word))


def _could_be_noun(word: str) -> bool:
    return len(word) >= 2 and word not in STOPWORDS and "NOUN" in readings(word)


def _verb_forms(word: str) -> tuple[bool, bool]:
    """(is a base verb form, is an inflected verb form) by the lexicon's VERB lemmas."""
    lemmas = readings(word).get("VERB", ())
    return word in lemmas, any(lemma != word for lemma in lemmas)


def _is_ambiguous_modifier(word: str) -> bool:
    """A possible adjective, or the -ing/-ed form of a verb: modifier or head of a noun phrase."""
    return "ADJ" in readings(word) or (word.endswith(("ing", "ed")) and _verb_forms(word)[1])


def _opens_noun_phrase(word: str) -> bool:
    """A determiner, possessive or number word, or a word the lexicon lists as an adjective."""
    return word in DETERMINERS or "ADJ" in readings(word)


def _closes_noun_phrase(word: str) -> bool:
    """The end of the caption, a function word other than and/or, or the -ing form of a verb
    (-s forms are not taken: "dogs" is a plural far more often than a verb)."""
    if word == "" or (word in STOPWORDS and word not in CONJUNCTIONS):
        return True
    return word.endswith("ing") and _verb_forms(word)[1]


def _is_plural(word: str, lemma: str) -> bool:
    return lemma != word or word in PLURAL_WITHOUT_S


def tokens(text: str) -> list[str]:
    """Lower-cased runs of letters (punctuation, digits and apostrophes split words)."""
    return re.findall(r"[a-z]+", text.lower())


def nouns(text: str) -> list[str]:
    """The noun occurrences of one caption, as noun lemmas, in order (rules 1-4 above)."""
    words = tokens(text)
    out: list[str] = []
    subject: tuple[str, str] | None = None        # (word, lemma) of the previous token if it was a noun
    for i, word in enumerate(words):
        prev = words[i - 1] if i > 0 else ""
        nxt = words[i + 1] if i + 1 < len(words) else ""
        is_noun = _could_be_noun(word)                                                  # rules 1-2
        if is_noun and _is_ambiguous_modifier(word):                                    # rule 3
            is_noun = _opens_noun_phrase(prev) and _closes_noun_phrase(nxt)
        if is_noun and "VERB" in readings(word):                                        # rule 4
            base, inflected = _verb_forms(word)
            if prev in VERB_CUES or nxt in OBJECT_CUES:                                # 4a
                is_noun = False
            elif subject is not None:                                                   # 4b
                plural = _is_plural(*subject)
                is_noun = not ((inflected and word.endswith("s") and not plural) or (base and plural))
        lemma = readings(word)["NOUN"][0] if is_noun else ""
        if is_noun:
            out.append(lemma)
        subject = (word, lemma) if is_noun else None
    return out


def noun_counts(texts: Iterable[str]) -> Counter:
    """Noun lemma -> number of occurrences over the whole corpus."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(nouns(text))
    return counts


def concept_vocabulary(texts: Iterable[str], size: int, min_count: int = 2) -> list[str]:
    """The `size` most frequent nouns occurring at least `min_count` times; order: count
    descending, then the word (so the result is a pure function of the corpus)."""
    return [word for word, _ in ranked_concepts(noun_counts(texts), size, min_count)]


def ranked_concepts(counts: Counter, size: int, min_count: int = 2) -> list[tuple[str, int]]:
    """(word, count) pairs in vocabulary order (see concept_vocabulary)."""
    if size < 0:
        raise ValueError(f"concept vocabulary size must be >= 0, got {size}")
    kept = [(w, c) for w, c in counts.items() if c >= min_count]
    return sorted(kept, key=lambda wc: (-wc[1], wc[0]))[:size]


def concept_prompt(concept: str, template: str = PROMPT_TEMPLATE) -> str:
    """The template sentence encoded by CLIP's text encoder for concept c (Eq. 1)."""
    return template.format(concept)


def ensemble_features(clip, words: list[str], templates: list[str], batch_size: int = 256) -> np.ndarray:
    """The text feature of each word: normalize(mean_t f(t(w))) over the templates t, where f is CLIP's
    unit text feature (one template: f("A photo of {w}") itself). -> [len(words), D] float32."""
    sentences = [concept_prompt(w, t) for w in words for t in templates]
    features = clip.encode_texts(sentences, batch_size).reshape(len(words), len(templates), -1).mean(axis=1)
    return (features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The artifact: concept words with the CLIP text feature of their template sentences
# ---------------------------------------------------------------------------------------------
def concept_table(counts: Counter, clip, size: int, min_count: int, dtype: str, batch_size: int = 256,
                  templates: list[str] = (PROMPT_TEMPLATE,), words: list[str] | None = None) -> pa.Table:
    """concept (str), count (int64: its occurrences as a noun in the corpus), text_feature
    (``ensemble_features``). The concepts are the corpus's top nouns (``ranked_concepts``), or
    ``words`` as given (a fixed list: size and min_count do not apply)."""
    if words is None:
        ranked = ranked_concepts(counts, size, min_count)
        if not ranked:
            raise ValueError(f"no noun occurs at least {min_count} times in the corpus: the concept vocabulary "
                             f"would be empty (lower concepts.min_count or use a larger corpus)")
    else:
        if not words:
            raise ValueError("the concept word list is empty")
        ranked = [(w, counts.get(w, 0)) for w in words]
    words = [w for w, _ in ranked]
    return pa.table({"concept": pa.array(words, pa.string()),
                     "count": pa.array([c for _, c in ranked], pa.int64()),
                     "text_feature": feature_array(ensemble_features(clip, words, list(templates), batch_size),
                                                   dtype)})
