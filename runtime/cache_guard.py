"""The near-miss guard: a veto on a semantic neighbour that differs from the query in something an embedding
blurs. Pure, no I/O beyond reading its vocabulary from the package once.

Two prompts can embed within a hair of each other and still want different answers: "the ibuprofen dose for
children" / "for adults", "convert A to B" / "B to A", "can I" / "must I". ``check`` compares the prompts
category by category and names the first one in which they disagree:

============  =====================================================================================
negation      how many negations
quoted        quoted strings, compared verbatim
how much      numbers (and Roman numerals after a name: "World War II"), units, currencies, ranges,
              superlatives, quantifiers (one item vs all of them)
who           age groups, pregnancy, species, gender, roles, year of study, organisation size
when          relative days and periods, eras, weekdays, months, seasons, versions ("python3", "es6")
where         countries, cities, regions (a place agrees with the places it lies in and that lie in it)
which way     opposite actions and directions, word order across a relation word, to/from a shared word, a
              word against its negated or opposite-prefixed form ("mute" / "unmute", "diabetic" / "non-diabetic",
              "overvalued" / "undervalued"), the same
              alternatives with another one chosen ("before or after? Before?" / "... After?")
modality      can / should / must / is it legal / is it safe
object        language, library, tool, product, file format, natural language, medication, colour; a
              modifier picking another variety of the same head noun ("green tea" / "black tea")
names         capitalised names, when each side has one the other lacks
============  =====================================================================================

The vocabulary is data (``runtime/data/guard/*.txt``, format in its README); this module holds the rules.
``baseline_guard`` is the guard as it was before the categories, frozen (``baseline.json``) so the quality
benchmark can show both side by side. ``signals`` gives the verifier (runtime.cache_verifier) the softer
differences the guard lets through.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from functools import lru_cache
from importlib import resources
from typing import Any

CATEGORIES = ("layout", "negation", "quoted", "how much", "who", "when", "where", "which way", "modality",
              "object", "names", "substitution")
_FILES = {"negation.txt": "negation", "how_much.txt": "how much", "who.txt": "who", "when.txt": "when",
          "where.txt": "where", "which_way.txt": "which way", "modality.txt": "modality",
          "object.txt": "object", "names.txt": "names"}
_RULES = frozenset({"conflict", "one-sided", "count", "ignore", "places", "map", "list"})


def _data(name: str) -> str:
    return (resources.files("runtime") / "data" / "guard" / name).read_text(encoding="utf-8")


def _norm_ws(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


@dataclass(frozen=True)
class Veto:
    """Why a neighbour may not answer: the category the prompts disagree in, and how."""

    category: str
    detail: str

    def __str__(self) -> str:
        return f"{self.category}: {self.detail}"


# -- vocabulary ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['’][A-Za-z]+)*|\d+(?:[.,]\d+)*(?:st|nd|rd|th)?|[%$€£¥]")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|`([^`]+)`|(?<![A-Za-z])'([^']+)'(?![A-Za-z])")
_SENT_END = re.compile(r"[.!?:;]\s*$")
_FREE_OF = re.compile(r"[A-Za-z]-free\b", re.IGNORECASE)  # "gluten-free": a negation ("without gluten")
_VERSIONED = re.compile(r"^[a-z]+\d+[a-z0-9]*$")  # python3, es6, ipv6, mp4, h264, q3, v2
_DIGITS = re.compile(r"^\d+(?:[.,]\d+)*(?:st|nd|rd|th)?$")
_ROMAN = re.compile(r"^(?=[IVX])X{0,3}(?:IX|IV|V?I{0,3})$")
_ROMAN_VALUE = {"I": 1, "V": 5, "X": 10}
_CLAUSE_END = re.compile(r"[.,;:!?)]")


def _roman(orig: list[str], words: list[str], i: int, function: frozenset[str], clause_end: bool) -> str | None:
    """A Roman numeral that numbers the capitalised name in front of it ("World War II", "Henry VIII", "Part
    IV"), as a number ("2", so "World War 2" agrees): another numeral is another war, monarch or sequel. Only
    after a capitalised word that is neither a function word ("Should I" is the pronoun) nor the prompt's first;
    a lone letter ("I", "V", "X") only where its clause ends ("World War I?"): "Steve I have seen" is a pronoun
    after a name (STS-B train)."""
    tok = orig[i]
    if i < 2 or not tok.isupper() or not _ROMAN.match(tok) or not orig[i - 1][:1].isupper() \
            or words[i - 1] in function or (len(tok) == 1 and not clause_end):
        return None
    total, top = 0, 0
    for ch in reversed(tok):
        v = _ROMAN_VALUE[ch]
        if v < top:
            total -= v
        else:
            total, top = total + v, v
    return f"{total:g}"


def _join_prefixes(text: str) -> str:
    """"non-diabetic" -> "nondiabetic": a hyphenated negating or opposite prefix (negation.txt [negating
    prefixes], which_way.txt [opposite prefixes]) stays on its word, so the word reads as the opposite of the bare one (``_prefixed_opposite``) and not as the same word
    after a stray "non"; "non-profit" and "nonprofit" become one spelling."""
    pattern = _lexicon().prefix_pattern
    return pattern.sub(r"\1", text) if "-" in text else text


@dataclass
class _Group:
    category: str
    section: str
    one_sided: bool
    classes: list[str] = field(default_factory=list)


@dataclass
class _Lexicon:
    # phrase (lower-case words, or exact-case words when exact) -> [(group index, class index)]; group -1 means
    # a counted word (negation), -2 a phrase that is claimed and ignored, -3 a place (class index into places)
    phrases: dict[tuple[str, ...], list[tuple[int, int]]]
    exact: dict[tuple[str, ...], list[tuple[int, int]]]
    max_len: int
    starts: set[str]  # first words of every phrase, folded or exact: most words start none
    groups: list[_Group]
    places: list[str]
    place_parent: dict[int, int]
    maps: dict[str, dict[str, str]]
    lists: dict[str, frozenset[str]]
    rewrites: _Rewrites
    prefix_pattern: re.Pattern[str] = re.compile(r"(?!x)x")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _fold(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    return w.replace("'", "")


class _Rewrites:
    """Literal spellings folded to one token, all in one regex pass (case-insensitive)."""

    def __init__(self, text: str) -> None:
        self.table: dict[str, str] = {}
        alts = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            src, dst = (s.strip() for s in line.split("=>"))
            self.table[src.lower()] = f" {dst} "
            pre = r"(?<![A-Za-z0-9])" if src[0].isalnum() else ""
            post = r"(?![A-Za-z0-9])" if src[-1].isalnum() else ""
            alts.append((len(src), pre + re.escape(src) + post))
        alts.sort(key=lambda a: -a[0])  # longest first: "asp.net" before ".net"
        self.pattern = re.compile("|".join(a for _, a in alts) or r"(?!x)x", re.IGNORECASE)

    def __call__(self, text: str) -> str:
        low = text.lower()
        if not any(src in low for src in self.table):  # the common case, at a fraction of the regex's cost
            return text
        return self.pattern.sub(lambda m: self.table[m.group(0).lower()], text)


def _section_lines(text: str, name: str) -> list[str]:
    """The lines of one ``[name]`` section of a vocabulary file, comments dropped."""
    lines: list[str] = []
    inside = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            inside = line[1:].startswith(name + "]")
        elif inside and line:
            lines.append(line)
    return lines


def _list_section(text: str, name: str) -> frozenset[str]:
    """The words of one ``[name] list`` section of a vocabulary file."""
    return frozenset(w.strip().lower() for line in _section_lines(text, name) for w in line.split(",") if w.strip())


@lru_cache(maxsize=1)
def _lexicon() -> _Lexicon:
    lex = _Lexicon({}, {}, 1, set(), [], [], {}, {}, {}, _Rewrites(_data("rewrites.txt")))
    parents: list[tuple[int, str]] = []

    def add(form: str, target: tuple[int, int]) -> None:
        form = form.strip()
        exact = form.startswith("=") or any(ch.isupper() for ch in form)
        form = form.lstrip("=")
        form = lex.rewrites(form)
        if "-" in form:
            form = lex.prefix_pattern.sub(r"\1", form)
        words = tuple(w if exact else _fold(w) for w in _words(form))
        if not words:
            return
        table = lex.exact if exact else lex.phrases
        table.setdefault(words, []).append(target)
        lex.starts.add(words[0])
        lex.max_len = max(lex.max_len, len(words))

    def canon(forms: str) -> str:
        return forms.split(",")[0].strip().lstrip("=").lower()

    # the negating prefixes are read first: every form below is matched with them joined (see _join_prefixes)
    prefixes = sorted(_list_section(_data("negation.txt"), "negating prefixes")
                      | {line.split("=")[0].strip().lower() for line in _section_lines(_data("which_way.txt"),
                                                                                         "opposite prefixes")},
                      key=len, reverse=True)
    if prefixes:
        lex.prefix_pattern = re.compile(rf"(?<![A-Za-z0-9])({'|'.join(map(re.escape, prefixes))})-(?=[A-Za-z])",
                                        re.IGNORECASE)
    for fname, category in _FILES.items():
        section, rule, shared = "", "", -1
        for raw in _data(fname).splitlines():
            line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
            if not line:
                continue
            m = re.fullmatch(r"\[([^\]]+)\]\s*(\S+)", line)
            if m:
                section, rule, shared = m.group(1), m.group(2), -1
                if rule not in _RULES:
                    raise ValueError(f"{fname}: unknown rule {rule!r} for [{section}]")
                continue
            if not rule:
                raise ValueError(f"{fname}: {line!r} before any [section]")
            if rule == "map":
                k, v = (s.strip() for s in line.split("="))
                lex.maps.setdefault(section, {})[k.lower()] = v
            elif rule == "list":
                lex.lists = {**lex.lists, section: lex.lists.get(section, frozenset())
                             | {w.strip().lower() for w in line.split(",") if w.strip()}}
            elif rule == "count":
                for form in line.split(","):
                    add(form, (-1, 0))
            elif rule == "ignore":
                for form in line.split(","):
                    add(form, (-2, 0))
            elif rule == "places":
                forms, _, parent = line.partition(">")
                idx = len(lex.places)
                lex.places.append(canon(forms))
                if parent.strip():
                    parents.append((idx, parent.strip().lower()))
                for form in forms.split(","):
                    add(form, (-3, idx))
            else:
                one_sided = rule == "one-sided"
                if "/" in line:
                    gi = len(lex.groups)
                    lex.groups.append(_Group(category, section, one_sided))
                    for ci, forms in enumerate(line.split("/")):
                        lex.groups[gi].classes.append(canon(forms))
                        for form in forms.split(","):
                            add(form, (gi, ci))
                else:
                    if shared < 0:
                        shared = len(lex.groups)
                        lex.groups.append(_Group(category, section, one_sided))
                    ci = len(lex.groups[shared].classes)
                    lex.groups[shared].classes.append(canon(line))
                    for form in line.split(","):
                        add(form, (shared, ci))
    index = {name: i for i, name in enumerate(lex.places)}
    for idx, parent in parents:
        if parent not in index:
            raise ValueError(f"where.txt: unknown parent place {parent!r}")
        lex.place_parent[idx] = index[parent]
    return lex


# -- one prompt, analysed once -------------------------------------------------------------------------------

@dataclass
class _Text:
    words: list[str]  # folded (lower-case) words, in order
    orig: tuple[str, ...]  # the same words as written
    classes: dict[int, frozenset[int]]  # group index -> classes named
    mentions: dict[int, tuple[int, ...]]  # group index -> how often each named class is named, by class
    negations: int
    places: frozenset[int]
    numbers: tuple[str, ...]
    versions: frozenset[str]
    quoted: tuple[str, ...]
    names: frozenset[str]
    claimed: dict[int, frozenset[str]]  # word position -> the categories that claimed it
    joined: tuple[bool, ...]  # word position -> written with a hyphen to the word before ("round-trip")


def _number(tok: str) -> str:
    raw = tok.replace(",", "")
    suffix = re.search(r"(st|nd|rd|th)$", raw)
    try:
        val = float(raw[: suffix.start()] if suffix else raw)
    except ValueError:
        return raw
    return f"{val:g}{'th' if suffix else ''}"


@lru_cache(maxsize=8192)
def _analyse(text: str) -> _Text:
    lex = _lexicon()
    rewritten = _join_prefixes(lex.rewrites(text))
    spans = list(_WORD.finditer(rewritten))
    orig = [m.group(0) for m in spans]
    words = [_fold(w) for w in orig]
    classes: dict[int, set[int]] = {}
    mentions: dict[tuple[int, int], int] = {}
    places: set[int] = set()
    claimed: dict[int, frozenset[str]] = {}
    negations = 0
    i = 0
    while i < len(words):
        if words[i] not in lex.starts and orig[i] not in lex.starts:
            i += 1
            continue
        hit = None
        for n in range(min(lex.max_len, len(words) - i), 0, -1):
            targets = lex.exact.get(tuple(orig[i:i + n])) or lex.phrases.get(tuple(words[i:i + n]))
            if targets:
                hit = (n, targets)
                break
        if hit is None:
            i += 1
            continue
        n, targets = hit
        kinds = set()
        for gi, ci in targets:
            if gi == -1:
                negations += 1
                kinds.add("negation")
            elif gi == -3:
                places.add(ci)
                kinds.add("where")
            elif gi >= 0:
                classes.setdefault(gi, set()).add(ci)
                mentions[(gi, ci)] = mentions.get((gi, ci), 0) + 1
                kinds.add(lex.groups[gi].category)
        for j in range(i, i + n):
            claimed[j] = frozenset(kinds)
        i += n
    negations += len(_FREE_OF.findall(text))
    number_words = lex.maps.get("number words", {})
    function = lex.lists.get("function words", frozenset())
    numbers = sorted([_number(w) for w in words if _DIGITS.match(w)]
                     + [number_words[w] for w in words if w in number_words]
                     + [r for r in (_roman(orig, words, i, function, i + 1 == len(spans) or bool(
                         _CLAUSE_END.search(rewritten[spans[i].end():spans[i + 1].start()])))
                         for i in range(len(orig))) if r])
    versions = frozenset(w for w in words if _VERSIONED.match(w))
    quoted = tuple(sorted(_norm_ws(next(g for g in m.groups() if g is not None)) for m in _QUOTED.finditer(text)))
    joined = tuple(i > 0 and rewritten[spans[i - 1].end():spans[i].start()] == "-" for i in range(len(spans)))
    return _Text(words, tuple(orig), {g: frozenset(c) for g, c in classes.items()},
                 {g: tuple(mentions[(g, ci)] for ci in sorted(c)) for g, c in classes.items()}, negations,
                 frozenset(places), tuple(numbers), versions, quoted, _names(rewritten, spans, words, claimed),
                 claimed, joined)


def _names(text: str, spans: list[re.Match[str]], words: list[str], claimed: dict[int, frozenset[str]]
           ) -> frozenset[str]:
    """Capitalised words that are not a sentence's first function word, acronyms and CamelCase, lower-cased;
    words a category already judges (places, tools, months) are left to it."""
    function = _lexicon().lists.get("function words", frozenset())
    alpha = [m.group(0) for m in spans[1:] if m.group(0)[:1].isalpha() and len(m.group(0)) > 3]
    # Title Case Headline: capitals carry no information, only acronyms and CamelCase count
    title_case = len(alpha) >= 4 and sum(t[:1].isupper() for t in alpha) >= 0.75 * len(alpha)
    out = set()
    for i, m in enumerate(spans):
        tok, low = m.group(0), words[i]
        if i in claimed or not tok[:1].isalpha() or low in function:
            continue
        acronym = len(tok) > 1 and tok.isupper()
        camel = bool(re.search(r"[a-z][A-Z]", tok))
        # a capital that opens a sentence says nothing ("Oh, ...", "Updated - ..."); prompts rarely open on a name
        opens = i == 0 or bool(_SENT_END.search(text[: m.start()]))
        capital = tok[:1].isupper() and not title_case and not opens
        if acronym or camel or capital:
            out.add(low)
    return frozenset(out)


# -- the checks --------------------------------------------------------------------------------------------------

def _place_agrees(a: int, others: frozenset[int], parent: dict[int, int]) -> bool:
    def line(p: int) -> set[int]:
        seen = {p}
        while p in parent and parent[p] not in seen:
            p = parent[p]
            seen.add(p)
        return seen

    up = line(a)
    return any(o in up or a in line(o) for o in others)


def _where(q: _Text, c: _Text) -> str | None:
    lex = _lexicon()
    if not q.places and not c.places:
        return None
    if not q.places or not c.places:
        side = q.places or c.places
        return f"a place on one side only ({', '.join(sorted(lex.places[p] for p in side))})"
    for a, others in ((p, c.places) for p in q.places):
        if not _place_agrees(a, others, lex.place_parent):
            return f"{lex.places[a]} vs {', '.join(sorted(lex.places[p] for p in others))}"
    for a in c.places:
        if not _place_agrees(a, q.places, lex.place_parent):
            return f"{', '.join(sorted(lex.places[p] for p in q.places))} vs {lex.places[a]}"
    return None


def _classes(q: _Text, c: _Text) -> Veto | None:
    """Opposing classes named on the two sides ("children" / "adults"); in a one-sided section, also a class
    that only one side names ("for children" / -)."""
    lex = _lexicon()
    for gi in sorted(set(q.classes) | set(c.classes)):
        qs, cs = q.classes.get(gi, frozenset()), c.classes.get(gi, frozenset())
        g = lex.groups[gi]
        if qs == cs:
            # both name the same alternatives but lean on different ones: "before or after a workout? Before?"
            # against "... After?". One class named more or less often says nothing ("a car ... the car").
            if len(qs) >= 2 and q.mentions[gi] != c.mentions[gi]:
                return Veto(g.category, f"{g.section}: the same alternatives, a different one chosen")
            continue

        def names(s: frozenset[int]) -> str:
            return "/".join(sorted(g.classes[i] for i in s)) or "-"

        if qs - cs and cs - qs:
            return Veto(g.category, f"{g.section} differ ({names(qs)} vs {names(cs)})")
        if g.one_sided:
            return Veto(g.category, f"{g.section}: {names(qs)} vs {names(cs)}")
    return None


_SWAP_WINDOW = 5
_DETERMINERS = frozenset({"a", "an", "the", "my", "your", "our", "their", "his", "her", "its", "this", "that",
                          "these", "those", "some"})


def _direction(q: _Text, c: _Text) -> str | None:
    """Two shared words close together in opposite order, where order carries meaning: a relation word sits
    between them on both sides ("convert A to B"), or both are key terms (names, places, roles, tools,
    numbers: "should a patient ask their surgeon"); or one shared word reached by opposite prepositions
    ("flights to Paris" / "flights from Paris")."""
    lex = _lexicon()
    rel = lex.maps.get("direction words", {})
    function = lex.lists.get("function words", frozenset())
    qpos = {w: i for i, w in reversed(list(enumerate(q.words)))}
    cpos = {w: i for i, w in reversed(list(enumerate(c.words)))}
    shared = [w for w in qpos if w in cpos and w not in function and w not in rel]
    for w in shared:
        pq, pc = _preposition(q.words, qpos[w]), _preposition(c.words, cpos[w])
        if pq and pc and pq != pc and {rel.get(pq), rel.get(pc)} in ({"to", "from"}, {"before", "after"}):
            return f"{pq} {w} vs {pc} {w}"
    shared.sort(key=qpos.get)
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            # near each other on both sides: in a long sentence some relation word sits between any two words
            if cpos[a] < cpos[b] or qpos[b] - qpos[a] > _SWAP_WINDOW or cpos[a] - cpos[b] > _SWAP_WINDOW:
                continue
            between_q = set(q.words[qpos[a] + 1: qpos[b]])
            between_c = set(c.words[cpos[b] + 1: cpos[a]])
            if any(w in rel for w in between_q) and any(w in rel for w in between_c):
                return f"order swapped ({a} / {b})"
            kinds = [_key_kinds(t, t_pos[w]) for t, t_pos in ((q, qpos), (c, cpos)) for w in (a, b)]
            if frozenset.intersection(*kinds) - {"negation"}:
                return f"key terms swapped ({a} / {b})"
    return None


_ENTITY_KINDS = frozenset({"names", "object", "where"})  # proper nouns, whichever list knows them
_PARTY_KINDS = frozenset({"entity", "who", "number"})
_PARTY_GAP = 4  # at most this many words between two parties for the words between to relate them


def _parties(t: _Text) -> list[tuple[str, str, frozenset[str]]]:
    """Every pair of consecutive parties (names, products, places, roles, numbers) in the order written, with
    the words that relate them: the content and relation words between them ("Apple buy Beats": buy; "Einstein
    older than Newton": older, than). Parties joined only by function words ("Einstein or Newton", "New York")
    relate nothing."""
    lex = _lexicon()
    function = lex.lists.get("function words", frozenset())
    rel = lex.maps.get("direction words", {})
    pos = [i for i in range(len(t.words)) if _key_kinds(t, i) & _PARTY_KINDS]
    out = []
    for i, j in zip(pos, pos[1:]):
        if t.words[i] == t.words[j] or j - i - 1 > _PARTY_GAP or j == i + 1:
            continue
        between = frozenset(w for w in t.words[i + 1:j] if (w not in function or w in rel) and w[:1].isalpha())
        if between:
            out.append((t.words[i], t.words[j], between))
    return out


def _party_order(q: _Text, c: _Text) -> str | None:
    """The same two parties on both sides around the same verb or comparison, in opposite order: "Did Apple buy
    Beats?" / "Did Beats buy Apple?", "Was Einstein older than Newton?" / "Was Newton older than Einstein?".
    Every mention counts, not the first: a prompt that names both parties first ("Einstein or Newton?") and
    then compares them still differs by the order of the comparison. A rephrased relation ("Beats bought by
    Apple") shares no word between the parties and is left to the verifier."""
    qp, cp = _parties(q), _parties(c)
    if not qp or not cp:
        return None
    rel = _lexicon().maps.get("direction words", {})

    def same(u: frozenset[str], v: frozenset[str]) -> bool:
        # the same relation: the same words, or a shared verb or comparative ("than" alone is not one:
        # "hotter than" / "colder than" is the converse, the same question)
        return u == v or any(x not in rel for x in u & v)

    for a, b, between in qp:
        if any(x == a and y == b and same(between, w) for x, y, w in cp):
            continue  # the same order on the other side too
        for x, y, w in cp:
            if x == b and y == a and same(between, w) and not any(
                    x2 == b and y2 == a and same(between, w2) for x2, y2, w2 in qp):
                return f"order of {a} / {b} around {'/'.join(sorted(between & w))} reversed"
    return None


def _titles(t: _Text) -> dict[str, frozenset[str]]:
    """Role words (who.txt) with the title word that follows each ("nurse" -> practitioner), "" when none; a
    title word that follows a role word is part of that title, not a role of its own."""
    heads = _lexicon().lists.get("title heads", frozenset())
    out: dict[str, set[str]] = {}
    for i, w in enumerate(t.words):
        if "who" not in t.claimed.get(i, ()) or (i > 0 and w in heads and "who" in t.claimed.get(i - 1, ())):
            continue
        nxt = t.words[i + 1] if i + 1 < len(t.words) else ""
        out.setdefault(w, set()).add(nxt.rstrip("s") if nxt in heads else "")
    return {w: frozenset(h) for w, h in out.items()}


def _title_differs(q: _Text, c: _Text) -> str | None:
    """A role word both prompts share, made into another title on one side only ("a nurse" / "a nurse
    practitioner", "a teacher" / "a teacher assistant"): two different jobs the role lists cannot all name."""
    qt, ct = _titles(q), _titles(c)
    for w in sorted(set(qt) & set(ct)):
        if qt[w] != ct[w]:
            def show(hs: frozenset[str]) -> str:
                return "/".join(f"{w} {h}".strip() for h in sorted(hs))
            return f"titles differ ({show(qt[w])} vs {show(ct[w])})"
    return None


def _prefixed_opposite(q: _Text, c: _Text) -> str | None:
    """A word on one side whose negated form is on the other ("mute" / "unmute", "like" / "dislike"): the
    lists cannot name every such pair."""
    qs, cs = set(q.words), set(c.words)
    lex = _lexicon()
    prefixes = lex.lists.get("negating prefixes", frozenset())
    opposite = lex.maps.get("opposite prefixes", {})
    for a, b in ((qs, cs), (cs, qs)):
        for w in a - b:
            for p in prefixes:
                base = w[len(p):]
                if w.startswith(p) and len(base) >= 3 and base in b and base not in a and w not in b:
                    return f"{base} vs {w}"
            for p, other in opposite.items():  # "overvalued" / "undervalued"
                base = w[len(p):]
                if w.startswith(p) and len(base) >= 3 and other + base in b and other + base not in a:
                    return f"{w} vs {other + base}"
    return None


_MAX_MODIFIER = 2


def _modifier(t: _Text, i: int) -> tuple[str, ...] | None:
    """The one or two words in front of word ``i`` when they modify it: opened by a determiner or preposition
    and neither function words nor words that only praise or grade (object.txt). A hyphenated compound
    ("round-trip", "first-year") counts as one word. Not the prompt's start: a headline's subject stands there
    in front of its verb ("Syria rebels leave" / "Syrian rebels retreat"). Places and names are left to the
    checks that know them (a country and its adjective agree there)."""
    lex = _lexicon()
    function = lex.lists.get("function words", frozenset())
    openers = lex.lists.get("modifier openers", frozenset())
    soft = lex.lists.get("evaluative modifiers", frozenset())
    j, n = i - 1, 0
    while t.words[j] not in openers:
        if j == 0 or t.words[j] in function or not t.words[j][:1].isalpha() or t.words[j] in t.names \
                or "where" in t.claimed.get(j, ()):
            return None
        if not t.joined[j + 1]:
            n += 1  # a hyphenated compound is one modifier
        j -= 1
        if n > _MAX_MODIFIER:
            return None
    mod = tuple(w for w in t.words[j + 1:i] if w not in soft)
    return mod or None


def _variant(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Two spellings or forms of one modifier rather than two modifiers: "grey" / "gray", "chipmaker" / "chip
    maker", "terrorism" / "terror", "camouflage" / "camouflaged" (one edit, or a shared start of 4 letters)."""
    if "".join(a) == "".join(b):
        return True
    lex = _lexicon()
    for x in a:  # one class of a vocabulary group ("final" / "last"): the vocabulary already says they agree
        for y in b:
            tx, ty = lex.phrases.get((x,), []), lex.phrases.get((y,), [])
            if any(gi >= 0 and (gi, ci) in ty for gi, ci in tx):
                return True
    for x in a:
        for y in b:
            if x[:4] == y[:4] and min(len(x), len(y)) >= 4:
                return True
            if len(x) == len(y) and sum(p != r for p, r in zip(x, y)) <= 1:
                return True
    return False


def _variety(q: _Text, c: _Text) -> str | None:
    """The same head word with a different modifier on each side: "a cup of green tea" / "a cup of black tea",
    "a suede jacket" / "a leather jacket". Each side's modifier must be absent from the other prompt (a modifier
    moved elsewhere in the sentence is the verifier's to weigh)."""
    function = _lexicon().lists.get("function words", frozenset())
    qset, cset = set(q.words), set(c.words)
    cpos: dict[str, list[int]] = {}
    for j, w in enumerate(c.words):
        cpos.setdefault(w, []).append(j)
    for i, w in enumerate(q.words):
        if w in function or w not in cpos or len(w) < 3 or not w[:1].isalpha() or i == 0 \
                or "negation" in q.claimed.get(i, ()) or (w.endswith("ed") and len(w) > 4):
            continue  # "-ed": a verb in the past ("the court accused"), not a noun a modifier picks a kind of
        if i + 1 < len(q.words) and q.joined[i + 1]:
            continue  # "first" in "first-year" is a modifier itself, not a head
        mq = _modifier(q, i)
        if not mq or any(m in cset for m in mq):
            continue
        for j in cpos[w]:
            if j == 0 or (j + 1 < len(c.words) and c.joined[j + 1]):
                continue
            mc = _modifier(c, j)
            if mc and not any(m in qset for m in mc) and not _variant(mq, mc):
                return f"{' '.join(mq)} {w} vs {' '.join(mc)} {w}"
    return None


def _key_kinds(t: _Text, i: int) -> frozenset[str]:
    """What kind of key term a word is (a category that claimed it, a name, a number), if any."""
    if i in t.claimed:
        kinds = t.claimed[i]
    elif t.words[i] in t.names:
        kinds = frozenset({"names"})
    else:
        return frozenset({"number"}) if _DIGITS.match(t.words[i]) else frozenset()
    return frozenset("entity" if k in _ENTITY_KINDS else k for k in kinds)


def _preposition(words: list[str], i: int) -> str | None:
    j = i - 1
    while j >= 0 and i - j <= 3 and words[j] in _DETERMINERS:
        j -= 1
    return words[j] if j >= 0 else None


def _contains(words: tuple[str, ...], phrase: str) -> bool:
    want = tuple(_words(phrase))
    n = len(want)
    return n == 0 or any(words[i:i + n] == want for i in range(len(words) - n + 1))


def check(query: str, candidate: str) -> Veto | None:
    """Why ``candidate`` (a cached prompt) may not answer ``query`` although their embeddings are close; None
    when no category tells them apart."""
    if _norm_ws(query) == _norm_ws(candidate):
        return None
    if "\n" in _norm_ws(query) or "\n" in _norm_ws(candidate):
        # code and pasted documents: layout is meaning (indentation) and the embedding blurs both
        return Veto("layout", "multi-line prompts match exactly or not at all")
    q, c = _analyse(query), _analyse(candidate)
    if q.negations != c.negations:
        return Veto("negation", f"{q.negations} vs {c.negations} negations")
    if q.quoted != c.quoted:
        # a quotation must appear, word for word and case kept, in the other prompt ('HeLLo' is not 'hello');
        # quoting a phrase the other prompt has unquoted changes nothing
        missing = [s for s in q.quoted if not _contains(c.orig, s)] + [s for s in c.quoted if not _contains(q.orig, s)]
        if missing:
            return Veto("quoted", f"quoted strings differ ({missing[:2]})")
    if q.numbers != c.numbers:
        return Veto("how much", f"numbers differ ({list(q.numbers)} vs {list(c.numbers)})")
    if q.versions != c.versions:
        return Veto("when", f"versions differ ({sorted(q.versions)} vs {sorted(c.versions)})")
    q_clock, c_clock = _clock(query), _clock(candidate)
    if q_clock != c_clock:
        return Veto("when", f"times of day differ ({sorted(q_clock)} vs {sorted(c_clock)})")
    negated = _negated_modifier(query, c) or _negated_modifier(candidate, q)
    if negated:
        return Veto("negation", negated)
    veto = _classes(q, c)
    if veto is not None:
        return veto
    title = _title_differs(q, c)
    if title:
        return Veto("who", title)
    where = _where(q, c)
    if where:
        return Veto("where", where)
    way = _direction(q, c) or _party_order(q, c) or _prefixed_opposite(q, c)
    if way:
        return Veto("which way", way)
    variety = _variety(q, c)
    if variety:
        return Veto("object", f"variety differs ({variety})")
    q_only, c_only = q.names - set(c.words), c.names - set(q.words)
    if q_only and c_only:
        return Veto("names", f"{sorted(q_only)} vs {sorted(c_only)}")
    # rules on the two prompts' shape, whatever the words: last, so a named category explains first
    for category, rule in (("substitution", _one_slot_changed), ("which way", _same_words_reordered),
                           ("negation", _negation_moved)):
        why = rule(q, c)
        if why:
            return Veto(category, why)
    return None


def _plain() -> frozenset[str]:
    lex = _lexicon()
    return lex.lists.get("function words", frozenset()) | lex.lists.get("request words", frozenset())


_COORDINATORS = frozenset({"and", "or", "nor", "vs", "versus", "plus"})


def _same_words_reordered(q: _Text, c: _Text) -> str | None:
    """The same words in the same frame, with content words traded between places: "euros for 100 dollars" /
    "dollars for 100 euros", "a company in Ireland hiring in Poland" / "in Poland hiring in Ireland". Two
    parties or ends trade roles, whichever words they are. A coordination read the other way round ("salt and
    pepper" / "pepper and salt") asks the same, and so does one block moved ("at sea level, what is ..."); a
    reworded frame (passive, possessive) is left alone because the frame's words then differ."""
    a, b = q.words, c.words
    if len(a) != len(b) or a == b:
        return None
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(diff) < 2 or sorted(a[i] for i in diff) != sorted(b[i] for i in diff):
        return None
    plain = _plain()
    if len({stem(a[i]) for i in diff if a[i] not in plain}) < 2:
        return None  # only function words moved ("is it" / "it is")
    lo, hi = diff[0], diff[-1]
    span_a, span_b = a[lo:hi + 1], b[lo:hi + 1]
    if any(span_b == span_a[k:] + span_a[:k] for k in range(1, len(span_a))):
        return None  # one block moved ("at sea level, what is ..." / "what is ... at sea level")
    for start in range(max(0, lo - 3), lo + 1):
        for end in range(hi + 1, min(len(a), hi + 4) + 1):
            span_a, span_b = a[start:end], b[start:end]
            for k, w in enumerate(span_a):
                if w in _COORDINATORS and span_b == span_a[k + 1:] + [w] + span_a[:k]:
                    return None
    return f"the same words in another order ({' '.join(q.orig[lo:hi + 1])} / {' '.join(c.orig[lo:hi + 1])})"


_CLAUSE_BREAKS = frozenset({"but", "although", "though", "whereas", "while"})


def _clauses(t: _Text) -> list[tuple[frozenset[str], int]]:
    """Each clause's content stems and how many negations it holds (clauses cut at but / although / ...)."""
    plain = _plain()
    out: list[tuple[frozenset[str], int]] = []
    words: set[str] = set()
    negs = 0
    for i, w in enumerate(t.words):
        if w in _CLAUSE_BREAKS:
            out.append((frozenset(words), negs))
            words, negs = set(), 0
            continue
        if "negation" in t.claimed.get(i, ()):
            if "negation" not in t.claimed.get(i - 1, ()):  # a phrase ("no one") is one negation
                negs += 1
        elif w not in plain:
            words.add(stem(w))
    out.append((frozenset(words), negs))
    return out


def _negation_moved(q: _Text, c: _Text) -> str | None:
    """As many negations on each side, in different clauses: "why isn't my dog eating but still drinking" /
    "why is my dog eating but not drinking". A clause is matched to the other side's clause sharing most of its
    content words, wherever it stands (reordered clauses are no change)."""
    qc, cc = _clauses(q), _clauses(c)
    if len(qc) < 2 and len(cc) < 2:
        return None  # one clause each: the count above already compared them
    for words, negs in qc:
        if not words:
            continue
        best, share = None, 0.0
        for other, other_negs in cc:
            union = words | other
            j = len(words & other) / len(union) if union else 0.0
            if j > share:
                best, share = other_negs, j
        if best is not None and share >= 0.5 and best != negs:
            return f"a negation moved to another clause ({negs} vs {best} in the clause on {sorted(words)[:3]})"
    return None


_SUFFIXES = ("ingly", "edly", "ings", "ing", "ies", "ied", "ed", "es", "ly", "s")


def stem(word: str) -> str:
    """A crude suffix stripper: enough to make "plays", "played" and "playing" one content word."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            return word[: -len(suf)]
    return word


def _edits(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _spelling(a: str, b: str) -> bool:
    """One word spelt two ways (colour / color, organise / organize): long, same start, at most two edits."""
    return min(len(a), len(b)) >= 5 and a[:2] == b[:2] and _edits(a, b) <= 2


def _one_slot_changed(q: _Text, c: _Text) -> str | None:
    """The prompts agree word for word except in one place, where a content word (or two) was replaced by
    another: "almond flour" / "coconut flour", "first week" / "first year", "company director" / "company
    shareholder". That is how a different question is made from a cached one, and no category list can name
    every pair of things; a paraphrase rewords more than one place, or changes only function words, an
    inflection or a spelling. The price: a synonym swapped into an otherwise identical prompt is a miss."""
    ops = [op for op in SequenceMatcher(None, q.words, c.words, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(ops) != 1 or ops[0][0] != "replace":
        return None
    _, i1, i2, j1, j2 = ops[0]
    if i2 - i1 > 2 or j2 - j1 > 2:
        return None
    plain = _plain()
    # negations were compared above, by count ("no one" / "nobody")
    a = [w for i, w in enumerate(q.words[i1:i2], i1) if w not in plain and "negation" not in q.claimed.get(i, ())]
    b = [w for j, w in enumerate(c.words[j1:j2], j1) if w not in plain and "negation" not in c.claimed.get(j, ())]
    if not a or not b or {stem(w) for w in a} == {stem(w) for w in b}:
        return None
    if len(a) == len(b) == 1 and _spelling(a[0], b[0]):
        return None
    return f"one word changed ({' '.join(q.orig[i1:i2])} vs {' '.join(c.orig[j1:j2])})"


_CLOCK = re.compile(r"\b(\d{1,2})(?::(\d\d))?\s*([ap])\.?\s?m\b\.?", re.IGNORECASE)


@lru_cache(maxsize=8192)
def _clock(text: str) -> frozenset[str]:
    """Clock times with their half of the day ("3 am", "3:30 p.m."): the numbers agree, the halves may not."""
    return frozenset(f"{int(h)}:{m or '00'}{ap.lower()}m" for h, m, ap in _CLOCK.findall(text))


_NEGATED_MODIFIER = re.compile(r"\b(non|anti)-([a-z]{3,})", re.IGNORECASE)


def _negated_modifier(text: str, other: _Text) -> str | None:
    """A hyphenated "non-" / "anti-" word on one side with no trace of it on the other ("non-alcoholic wine" /
    "wine", "a non-stick pan" / "a pan"): the prefixed form against its bare one is ``_prefixed_opposite``'s."""
    words = set(other.words)
    for prefix, base in _NEGATED_MODIFIER.findall(text):
        joined = (prefix + base).lower()
        if joined not in words and base.lower() not in words:
            return f"{prefix}-{base} on one side only"
    return None


def prepare(text: str) -> None:
    """Analyse ``text`` now (the analysis is cached): a lookup does this for its prompt while the cache finds
    candidates, so that judging them afterwards is only the comparisons."""
    _analyse(text)


def guard(query: str, candidate: str) -> str | None:
    """``check`` as a reason string ("who: age groups differ (child vs adult)"); None to accept."""
    veto = check(query, candidate)
    return None if veto is None else str(veto)


def signals(query: str, candidate: str) -> dict[str, float]:
    """Differences the guard tolerates but a verifier should weigh: counts, not vetoes."""
    q, c = _analyse(query), _analyse(candidate)
    qw, cw = set(q.words), set(c.words)
    lex = _lexicon()
    one_sided_groups = sum(1 for gi in set(q.classes) ^ set(c.classes) if not lex.groups[gi].one_sided)
    return {
        "negation_diff": float(abs(q.negations - c.negations)),
        "numbers_diff": float(len(set(q.numbers) ^ set(c.numbers))),
        "names_one_sided": float(len(q.names - cw) + len(c.names - qw)),
        "category_one_sided": float(one_sided_groups),
        "places_diff": float(len(q.places ^ c.places)),
        "direction": float(_direction(q, c) is not None),
        "quoted_diff": float(q.quoted != c.quoted),
    }


# -- the guard before categories (frozen: benchmarks compare against it) ------------------------------------------

class _Baseline:
    def __init__(self) -> None:
        d = json.loads(_data("baseline.json"))
        self.negations = frozenset(d["negations"])
        self.antonyms = tuple(tuple(p) for p in d["antonyms"])
        self.units = frozenset(d["units"])
        self.tech_terms = frozenset(d["tech_terms"])
        self.small_numbers: dict[str, str] = d["small_numbers"]
        self.asymmetric = frozenset(d["asymmetric"])
        self.stop = frozenset(d["stop"])
        self.synonyms: dict[str, str] = d["synonyms"]
        self.openers = frozenset(d["common_openers"])
        self.unit_canon: dict[str, str] = d["unit_canon"]


@lru_cache(maxsize=1)
def _baseline() -> _Baseline:
    return _Baseline()


_B_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+#'’\-\.]*[A-Za-z0-9+#]|[A-Za-z]"
                      r"|\d+(?:[.,]\d+)*(?:st|nd|rd|th)?|[%$€£¥°]")
_B_NUMBER = re.compile(r"(?<![A-Za-z])[-+]?\d+(?:[.,]\d+)*(?:st|nd|rd|th)?")


def _b_lower_words(text: str) -> list[str]:
    b = _baseline()
    out = []
    for tok in _B_TOKEN.findall(text):
        w = tok.lower().replace("’", "'")
        if w.endswith("'s"):
            w = w[:-2]
        w = w.replace("'", "")
        out.append(b.synonyms.get(w, w))
    return out


def _b_numbers(text: str) -> list[str]:
    b = _baseline()
    nums = []
    for m in _B_NUMBER.finditer(text):
        raw = m.group(0).replace(",", "")
        try:
            val = float(re.sub(r"(st|nd|rd|th)$", "", raw))
            suffix = re.search(r"(st|nd|rd|th)$", raw)
            nums.append(f"{val:g}{'th' if suffix else ''}")
        except ValueError:
            nums.append(raw)
    for w in _b_lower_words(text):
        if w in b.small_numbers:
            v = b.small_numbers[w]
            nums.append(v if not v.endswith(("st", "nd", "rd")) else f"{v[:-2]}th")
    return sorted(nums)


def _b_entities(text: str) -> list[str]:
    b = _baseline()
    seen: list[str] = []
    words = [t for t in _B_TOKEN.findall(text)[1:] if t[:1].isalpha() and len(t) > 3]
    title_case = len(words) >= 4 and sum(t[:1].isupper() for t in words) >= 0.75 * len(words)
    for m in _B_TOKEN.finditer(text):
        tok = m.group(0)
        low = tok.lower().replace("’", "'")
        if low.endswith("'s"):
            low = low[:-2]
            tok = tok[:-2]
        low = low.replace("'", "")
        before = text[: m.start()]
        sentence_start = not before.strip() or bool(_SENT_END.search(before))
        is_entity = False
        if low in b.tech_terms:
            is_entity = True
        elif title_case:
            is_entity = (len(tok) > 1 and tok.isupper() and tok.isalpha()) or bool(re.search(r"[a-z][A-Z]", tok))
        elif tok[:1].isupper() and not sentence_start and low not in b.stop and low != "i":
            is_entity = True
        elif len(tok) > 1 and tok.isupper() and tok.isalpha():
            is_entity = True
        elif re.search(r"[a-z][A-Z]", tok):
            is_entity = True
        elif sentence_start and tok[:1].isupper() and low not in b.stop and low not in b.openers:
            is_entity = True
        if is_entity and low not in seen:
            seen.append(low)
    return seen


def _b_quoted(text: str) -> list[str]:
    return sorted(_norm_ws(next(g for g in m.groups() if g is not None)) for m in _QUOTED.finditer(text))


def _b_units(words: list[str], text: str) -> list[str]:
    b = _baseline()
    found = {w for w in words if w in b.units}
    found |= {s for s in ("%", "$", "€", "£", "¥", "°c", "°f") if s in text.lower()}
    found -= {"m", "g", "l", "c", "f", "s", "w", "v"}
    for m in re.finditer(r"\d\s*([A-Za-z°%]+)\b", text):
        u = m.group(1).lower()
        if u in b.units:
            found.add(u)
    return sorted(b.unit_canon.get(u, u) for u in found)


def _b_swapped(qw: list[str], cw: list[str], key_terms: set[str]) -> tuple[str, str] | None:
    b = _baseline()

    def occurrences(words: list[str]) -> dict[tuple[str, int], int]:
        seen: dict[str, int] = {}
        out = {}
        for i, w in enumerate(words):
            n = seen.get(w, 0)
            seen[w] = n + 1
            out[(w, n)] = i
        return out

    qo, co = occurrences(qw), occurrences(cw)
    shared = [t for t in qo if t in co and t[0] not in b.stop]
    if len(shared) < 2:
        return None
    shared.sort(key=qo.get)
    for i, a in enumerate(shared):
        for bb in shared[i + 1:]:
            if a[0] == bb[0] or co[a] < co[bb]:
                continue
            if a[0] in key_terms and bb[0] in key_terms:
                return a[0], bb[0]
            between = set(qw[qo[a] + 1: qo[bb]]) | set(cw[co[bb] + 1: co[a]])
            if between & b.asymmetric:
                return a[0], bb[0]
    return None


def baseline_guard(query: str, candidate: str) -> str | None:
    """The guard before categories (negation, numbers, quoted strings, units, names, antonym pairs, swapped
    order), unchanged: the benchmark's "today's guard"."""
    b = _baseline()
    if _norm_ws(query) == _norm_ws(candidate):
        return None
    if "\n" in _norm_ws(query) or "\n" in _norm_ws(candidate):
        return "multi-line prompts match exactly or not at all"
    qw, cw = _b_lower_words(query), _b_lower_words(candidate)
    qset, cset = set(qw), set(cw)
    qn, cn = [w for w in qw if w in b.negations], [w for w in cw if w in b.negations]
    if len(qn) != len(cn):
        return f"negation differs ({qn or '-'} vs {cn or '-'})"
    qnum, cnum = _b_numbers(query), _b_numbers(candidate)
    if qnum != cnum:
        return f"numbers differ ({qnum} vs {cnum})"
    if _b_quoted(query) != _b_quoted(candidate):
        return "quoted strings differ"
    qu, cu = _b_units(qw, query), _b_units(cw, candidate)
    if qu != cu:
        return f"units differ ({qu} vs {cu})"
    qe, ce = _b_entities(query), _b_entities(candidate)
    only = sorted({e for e in qe if e not in cset} | {e for e in ce if e not in qset})
    if only:
        return f"names differ ({only})"
    for pair in b.antonyms:
        qa = {w for w in pair if w in qset}
        ca = {w for w in pair if w in cset}
        if qa and ca and qa != ca:
            return f"opposite terms ({'/'.join(sorted(qa))} vs {'/'.join(sorted(ca))})"
    key_terms = set(qe) | {w for w in qw if any(ch.isdigit() for ch in w)} | set(qu)
    swap = _b_swapped(qw, cw, key_terms)
    if swap:
        return f"order swapped ({swap[0]} / {swap[1]})"
    return None


def vocabulary_summary() -> dict[str, Any]:
    """Sections and class counts per category (for docs and tests)."""
    lex = _lexicon()
    out: dict[str, Any] = {}
    for g in lex.groups:
        out.setdefault(g.category, {}).setdefault(g.section, 0)
        out[g.category][g.section] += len(g.classes)
    out.setdefault("where", {})["places"] = len(lex.places)
    return out
