"""The text tools behind the original CHAIR script (LisaAnne/Hallucination `utils/chair.py`),
re-implemented verbatim so `mmalign eval chair --protocol reference` needs neither package:

- `singularize`: Pattern 2.6's `pattern.en.singularize` (clips/pattern, BSD-3-Clause,
  © 2010 University of Antwerp), rules and word lists copied as they are, including the
  two missing commas of 2.6 ("wildebeest" "carp" and "water" "cheese", "zombie" "bogie" are
  one string each; Pattern 3.6 added the commas: no COCO word is affected). Its known misses on
  COCO words: "bus" -> "bu", "ties" -> "ty", "canoes" -> "cano", "glass" -> "glas",
  "grass" -> "gras"; every word ending in "our" gets "my" ("four" -> "fmy": irregular "our").
- `word_tokenize`: NLTK's `word_tokenize` = Punkt sentences, then `NLTKWordTokenizer`
  (improved Treebank) on each. The word tokenizer's regexes are copied from NLTK 3.10 (what the
  script or its Python 3 port gets installed today; NLTK < 3.9 left a leading single quote on
  the word: "'dog'" -> "'dog", "'", so the word is no mention there). Punkt's
  trained English model is not: sentences end at ".", "!" or "?" followed by white space,
  except after the abbreviations in `ABBREVIATIONS` (Punkt's model knows more, and learnt
  orthographic rules; captions rarely differ). Hyphenated words stay one token
  ("dog-shaped", "double-decker"), possessives split ("dog's" -> "dog", "'s").
"""

from __future__ import annotations

import re

# -- pattern.en.singularize (Pattern 2.6) ----------------------------------------------------
SINGULAR_RULES = [(re.compile(a), b) for a, b in [
    (r'(?i)(.)ae$', '\\1a'), (r'(?i)(.)itis$', '\\1itis'), (r'(?i)(.)eaux$', '\\1eau'),
    (r'(?i)(quiz)zes$', '\\1'), (r'(?i)(matr)ices$', '\\1ix'), (r'(?i)(ap|vert|ind)ices$', '\\1ex'),
    (r'(?i)^(ox)en', '\\1'), (r'(?i)(alias|status)es$', '\\1'), (r'(?i)([octop|vir])i$', '\\1us'),
    (r'(?i)(cris|ax|test)es$', '\\1is'), (r'(?i)(shoe)s$', '\\1'), (r'(?i)(o)es$', '\\1'),
    (r'(?i)(bus)es$', '\\1'), (r'(?i)([m|l])ice$', '\\1ouse'), (r'(?i)(x|ch|ss|sh)es$', '\\1'),
    (r'(?i)(m)ovies$', '\\1ovie'), (r'(?i)(.)ombies$', '\\1ombie'), (r'(?i)(s)eries$', '\\1eries'),
    (r'(?i)([^aeiouy]|qu)ies$', '\\1y'),
    (r"([aeo]l)ves$", "\\1f"), (r"([^d]ea)ves$", "\\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", "\\1fe"), (r'(?i)([lr])ves$', '\\1f'), (r"([aeo])ves$", "\\1ve"),
    (r'(?i)(sive)s$', '\\1'), (r'(?i)(tive)s$', '\\1'), (r'(?i)(hive)s$', '\\1'), (r'(?i)([^f])ves$', '\\1fe'),
    (r'(?i)(^analy)ses$', '\\1sis'),
    (r'(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$', '\\1\\2sis'),
    (r'(?i)(.)opses$', '\\1opsis'), (r'(?i)(.)yses$', '\\1ysis'), (r'(?i)(h|d|r|o|n|b|cl|p)oses$', '\\1ose'),
    (r'(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$', '\\1ose'), (r'(?i)(.)oses$', '\\1osis'),
    (r'(?i)([ti])a$', '\\1um'), (r'(?i)(n)ews$', '\\1ews'), (r'(?i)s$', ''),
]]
SINGULAR_UNINFLECTED = {
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest" "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors",  # noqa: ISC001
    "christmas", "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod",
    "graffiti", "mews", "species", "contretemps", "mumps", "swine", "corps", "news", "swiss"}
SINGULAR_UNCOUNTABLE = {
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research",
    "water" "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard",  # noqa: ISC001
    "sand"}
SINGULAR_IE = {
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie",
    "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "^pie",
    "sweetie", "zombie" "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie",  # noqa: ISC001
    "quickie", "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie",
    "rookie", "valkyrie"}
SINGULAR_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon"}
PLURAL_PREPOSITIONS = {
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below",
    "for", "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto",
    "around", "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt",
    "beyond", "but", "by"}


def singularize(word: str) -> str:
    """pattern.en.singularize(word) of Pattern 2.6, step for step (see the module docstring)."""
    if "-" in word:  # mothers-in-law
        w = word.split("-")
        if len(w) > 1 and w[1] in PLURAL_PREPOSITIONS:
            return singularize(w[0]) + "-" + "-".join(w[1:])
    if word.endswith("'"):  # dogs' => dog's
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in SINGULAR_UNINFLECTED) or any(x.endswith(w) for x in SINGULAR_UNCOUNTABLE):
        return word
    if any(w.endswith(x + "s") for x in SINGULAR_IE):
        return w
    for x, singular in SINGULAR_IRREGULAR.items():
        if w.endswith(x):
            return re.sub('(?i)' + x + '$', singular, word)
    for suffix, inflection in SINGULAR_RULES:
        m = suffix.search(word)
        if m:
            for k, g in enumerate(m.groups()):
                if g is None:
                    inflection = inflection.replace('\\' + str(k + 1), '')
            return suffix.sub(inflection, word)
    return word


# -- nltk.word_tokenize ---------------------------------------------------------------------
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "approx", "inc", "co"}
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)")
_STARTING_QUOTES = [(re.compile("([«“‘„]|[`]+)", re.U), r" \1 "), (re.compile(r"^\""), r"``"),
                    (re.compile(r"(``)"), r" \1 "), (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
                    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", re.U), r"\1 ")]
_ENDING_QUOTES = [(re.compile("([»”’])", re.U), r" \1 "), (re.compile(r"''"), " '' "), (re.compile(r'"'), " '' "),
                  (re.compile(r"\s+"), " "),
                  (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
                  (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 ")]
_PUNCTUATION = [(re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$", re.U), r"\1 \2 \3 "),
                (re.compile(r"([:,])([^\d])"), r" \1 \2"), (re.compile(r"([:,])$"), r" \1 "),
                (re.compile(r"\.{2,}", re.U), r" \g<0> "), (re.compile(r"[;@#$%&]"), r" \g<0> "),
                (re.compile(r"[\u2012-\u2015]", re.UNICODE), r" \g<0> "),
                (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "), (re.compile(r"[?!]"), r" \g<0> "),
                (re.compile(r"([^'])' "), r"\1 ' "), (re.compile(r"[*]", re.U), r" \g<0> ")]
_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS = [re.compile(p) for p in (
    r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b", r"(?i)\b(gon)(?#X)(na)\b",
    r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b", r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)",
    r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b")]


def sentences(text: str) -> list[str]:
    """Sentences of `text`: a stand-in for Punkt (see the module docstring)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        before = text[start:m.start()].split()
        if m.group() == "." and before and before[-1].lower().strip("(\"'") in ABBREVIATIONS:
            continue
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def treebank_tokenize(text: str) -> list[str]:
    """NLTKWordTokenizer().tokenize(text): NLTK's regexes, in NLTK's order."""
    for regexp, sub in _STARTING_QUOTES + _PUNCTUATION + [_PARENS, _DOUBLE_DASHES]:
        text = regexp.sub(sub, text)
    text = " " + text + " "
    for regexp, sub in _ENDING_QUOTES:
        text = regexp.sub(sub, text)
    for regexp in _CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize(text): each sentence through `treebank_tokenize`."""
    return [tok for sentence in sentences(text) for tok in treebank_tokenize(sentence)]
