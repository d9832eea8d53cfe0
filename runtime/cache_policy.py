"""What the response cache may serve, for how long, and to whom.

Pure rules, no I/O: the cache actor stores rows, the caller-side ``CacheClient`` (actors/cache.py) asks these
functions every question that decides correctness.

Serving a cached answer to a question that is not the same question is the worst thing the cache can do, so
every rule here leans towards a miss:

* ``Scope`` is a hard partition. Two requests may share a semantic answer only if tenant, system prompt +
  tools, model, every turn except the last user turn, and every answer-changing parameter are identical. The
  cache actor filters on ``scope_id`` before the vector search, so a neighbour from another scope is never
  even a candidate.
* ``exact_key`` hashes everything that can change the answer, with whitespace and content-shape normalised so
  trivially different spellings of the same request share a key.
* ``bypass_reason`` keeps real-time questions, turns the cache cannot judge (images, tool traffic) and
  opted-out requests away from the cache entirely.
* ``guard`` vetoes a semantic neighbour that clears the similarity threshold but differs in something an
  embedding is known to blur: negation, numbers, names, quoted strings, units, antonyms, swapped roles.

``max_tokens`` is deliberately in no key: the model never sees it (it only truncates), and only complete
``end_turn`` answers are stored, so a stored answer is a valid answer for any request whose ``max_tokens`` it
fits in. ``answer_fits`` checks that instead of splitting the cache by a bucketed ``max_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["factual", "code", "analysis"]

# request fields that never change the answer's content; everything else is answer-changing by default, so an
# unknown future parameter splits the cache instead of silently merging different answers
_IGNORED_PARAMS = frozenset({"metadata", "stream", "max_tokens", "model", "service_tier", "timeout",
                             "extra_headers", "extra_query", "extra_body", "betas"})
# parameters hashed into their own Scope field
_SCOPE_FIELDS = frozenset({"messages", "system", "tools"})

def _norm_ws(text: str) -> str:
    # only the ends and line endings: inner whitespace can be meaning (indentation decides what a loop holds)
    return text.replace("\r\n", "\n").strip()


def _sha(obj: Any, n: int = 64) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def _canon_block(block: Any) -> Any:
    """One content block with prompt-caching markers dropped and text whitespace normalised."""
    if isinstance(block, str):
        return {"type": "text", "text": _norm_ws(block)}
    if not isinstance(block, dict):
        return block
    out = {k: _canon_value(v) for k, v in block.items() if k not in ("cache_control", "citations")}
    if out.get("type") == "text" and isinstance(out.get("text"), str):
        out["text"] = _norm_ws(out["text"])
    return out


def _canon_value(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _canon_value(x) for k, x in v.items() if k != "cache_control"}
    if isinstance(v, (list, tuple)):
        return [_canon_value(x) for x in v]
    return v


def _canon_content(content: Any) -> list[Any]:
    # "hi" and [{"type": "text", "text": "hi"}] are the same prompt to the API
    if isinstance(content, str):
        return [_canon_block(content)]
    if isinstance(content, (list, tuple)):
        return [_canon_block(b) for b in content]
    return [content]


def _canon_message(msg: Any) -> Any:
    if not isinstance(msg, dict):
        return msg
    return {"role": msg.get("role"), "content": _canon_content(msg.get("content", ""))}


def _canon_system(system: Any) -> Any:
    if system is None:
        return None
    blocks = _canon_content(system)
    if all(isinstance(b, dict) and b.get("type") == "text" for b in blocks):
        return _norm_ws(" ".join(b.get("text", "") for b in blocks))
    return blocks


def _last_user_index(messages: list[Any]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return None


def _block_text(block: Any) -> str | None:
    if isinstance(block, str):
        return block
    if isinstance(block, dict) and block.get("type") == "text":
        return str(block.get("text", ""))
    return None


@dataclass(frozen=True)
class Scope:
    """The hard partition a semantic hit must stay inside."""

    tenant: str
    system_hash: str
    model: str
    context_hash: str
    params_hash: str

    def scope_id(self) -> str:
        # 32 hex chars: collision-safe for any realistic number of scopes, short enough to index cheaply
        return _sha([self.tenant, self.system_hash, self.model, self.context_hash, self.params_hash], 32)


def scope_for(params: dict, model: str, tenant: str | None) -> Scope:
    messages = list(params.get("messages") or [])
    last = _last_user_index(messages)
    # everything except the last user turn's text, including an assistant prefill after it: the prefill
    # steers the answer as much as the history does
    context = [_canon_message(m) for i, m in enumerate(messages) if i != last]
    if last is not None:
        context.insert(last, {"role": "user", "content": "<last-user-turn>"})
    system = {"system": _canon_system(params.get("system")), "tools": _canon_value(params.get("tools"))}
    rest = {k: _canon_value(v) for k, v in params.items() if k not in _IGNORED_PARAMS | _SCOPE_FIELDS}
    return Scope(
        tenant=tenant or "",
        system_hash=_sha(system, 32),
        model=model,
        context_hash=_sha(context, 32),
        params_hash=_sha(rest, 32),
    )


def exact_key(params: dict, model: str, tenant: str | None) -> str:
    canon = {
        "v": 1,
        "tenant": tenant or "",
        "model": model,
        "system": _canon_system(params.get("system")),
        "messages": [_canon_message(m) for m in params.get("messages") or []],
        "rest": {k: _canon_value(v) for k, v in params.items()
                 if k not in _IGNORED_PARAMS and k not in ("system", "messages")},
    }
    return _sha(canon)


def last_user_text(params: dict) -> str:
    """Text of the last user turn (text blocks joined by newlines); '' when there is none."""
    messages = list(params.get("messages") or [])
    last = _last_user_index(messages)
    if last is None:
        return ""
    content = messages[last].get("content", "")
    if isinstance(content, str):
        return content.strip()
    parts = [t for t in (_block_text(b) for b in content or []) if t is not None]
    return "\n".join(parts).strip()


# -- classification and TTL ---------------------------------------------------------------------------------

# code answers age slowest (24 h), analysis in between, plain facts fastest: facts are what changes in the
# world. The rules read top-down: a code signal wins over an analysis signal ("compare these two functions").
_CODE_RE = re.compile(
    r"```|\b(def|class|import|return|lambda|const|let|var|async|await|struct|fn|func|SELECT|INSERT)\b"
    r"|\b(code|function|method|script|snippet|program|compile[rsd]?|compiling|debug|bug|stack ?trace|exception"
    r"|regex|regexp|sql|query|api|library|package|module|python|javascript|typescript|java|golang|rust|c\+\+|c#"
    r"|ruby|php|swift|kotlin|bash|shell|pandas|numpy|react|django|flask|docker|kubernetes|git|json|yaml|html"
    r"|css|unit test|refactor|implement|syntax|variable|array|dict(ionary)?|list comprehension)\b"
    r"|[a-z_]+\(\)|\w+\.\w+\(",
    re.IGNORECASE,
)
_ANALYSIS_RE = re.compile(
    r"\b(analy[sz]e|analysis|compare|comparison|contrast|evaluate|evaluation|assess|critique|review|pros and cons"
    r"|trade-?offs?|advantages|disadvantages|implications?|strategy|strategies|recommend(ation)?s?|should (i|we)"
    r"|why (do|does|did|is|are|would|might)|explain why|argue|argument|opinion|essay|in depth|impact of"
    r"|what are the (risks|benefits))\b",
    re.IGNORECASE,
)


def classify(text: str) -> Kind:
    """'code' if the text reads as a programming question, else 'analysis' if it asks for judgement or
    comparison, else 'factual'. Readable keyword rules: see _CODE_RE and _ANALYSIS_RE."""
    if _CODE_RE.search(text or ""):
        return "code"
    if _ANALYSIS_RE.search(text or ""):
        return "analysis"
    return "factual"


def ttl_for(kind: str, cache_settings: Any) -> float:
    return {
        "factual": cache_settings.ttl_factual_s,
        "code": cache_settings.ttl_code_s,
        "analysis": cache_settings.ttl_analysis_s,
    }.get(kind, cache_settings.ttl_factual_s)  # unknown kind: the shortest-lived class


# -- bypass ---------------------------------------------------------------------------------------------------

_JUDGEABLE_BLOCKS = frozenset({"text"})


def _bypass_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    alts = sorted((re.escape(w.strip()).replace(r"\ ", r"\s+") for w in words if w.strip()), key=len,
                  reverse=True)
    return re.compile(r"\b(" + "|".join(alts) + r")\b", re.IGNORECASE) if alts else re.compile(r"(?!x)x")


_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}


def bypass_reason(params: dict, cache_settings: Any, cache_enabled: bool = True) -> str | None:
    """Why this request must not touch the cache (neither read nor write); None when it may."""
    if not cache_enabled:
        return "cache disabled for this request"
    if not getattr(cache_settings, "enabled", True):
        return "cache disabled in settings"
    messages = params.get("messages") or []
    if not messages:
        return "no messages"
    for m in messages:
        content = m.get("content", "") if isinstance(m, dict) else None
        if isinstance(content, str):
            continue
        for block in content or []:
            btype = block.get("type") if isinstance(block, dict) else None
            if btype not in _JUDGEABLE_BLOCKS:
                # images, documents, tool calls and tool results: the text alone cannot say two requests match
                return f"non-text content ({btype or type(block).__name__})"
    text = last_user_text(params)
    if not text:
        return "no user text"
    words = tuple(getattr(cache_settings, "bypass_words", ()) or ())
    pat = _PATTERNS.get(words)
    if pat is None:
        pat = _PATTERNS.setdefault(words, _bypass_pattern(words))
    hit = pat.search(text)
    if hit:
        return f"real-time word {hit.group(0).lower()!r}"
    return None


def is_storable(message: Any) -> bool:
    """Only complete, successful, text answers are worth serving again."""
    if not isinstance(message, dict) or message.get("stop_reason") != "end_turn":
        return False
    if message.get("type", "message") != "message" or message.get("role", "assistant") != "assistant":
        return False
    content = message.get("content") or []
    if not isinstance(content, list) or not content:
        return False
    has_text = False
    for block in content:
        if not isinstance(block, dict):
            return False
        btype = block.get("type")
        if btype == "text":
            has_text = has_text or bool(str(block.get("text", "")).strip())
        elif btype not in ("thinking", "redacted_thinking"):
            return False  # tool_use, server tool results, anything unknown
    return has_text


def answer_fits(message: Any, max_tokens: Any) -> bool:
    """A stored answer longer than this request's max_tokens would be one the API could never have given."""
    if not isinstance(max_tokens, int) or not isinstance(message, dict):
        return True
    usage = message.get("usage") or {}
    out = usage.get("output_tokens") if isinstance(usage, dict) else None
    return not isinstance(out, int) or out <= max_tokens


# -- the guard ------------------------------------------------------------------------------------------------

_NEGATIONS = frozenset({
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "nowhere", "cannot", "without",
    "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "wont", "wouldnt", "shouldnt", "couldnt",
    "cant", "hasnt", "havent", "hadnt", "mustnt", "neednt", "unsafe", "illegal", "invalid", "impossible",
    "unable", "unsupported", "disallowed", "forbidden",
})

# pairs whose members flip an answer; the guard rejects when one side uses one member and the other side the
# other (one side mentioning a pair and the other not is left to the similarity threshold)
_ANTONYMS: tuple[tuple[str, ...], ...] = (
    ("on", "off"), ("enable", "disable"), ("enabled", "disabled"), ("true", "false"), ("yes", "no"),
    ("increase", "decrease"), ("increasing", "decreasing"), ("raise", "lower"), ("increase", "reduce"),
    ("increase", "lower"), ("raise", "reduce"), ("min", "max"), ("minimum", "maximum"),
    ("minimize", "maximize"), ("before", "after"), ("up", "down"), ("upgrade", "downgrade"),
    ("add", "remove"), ("add", "delete"), ("insert", "delete"), ("encode", "decode"), ("encrypt", "decrypt"),
    ("compress", "decompress"), ("serialize", "deserialize"), ("start", "stop"), ("open", "close"),
    ("buy", "sell"), ("import", "export"), ("upload", "download"), ("input", "output"), ("push", "pull"),
    ("ascending", "descending"), ("above", "below"), ("over", "under"), ("more", "less"), ("more", "fewer"),
    ("most", "least"), ("best", "worst"), ("better", "worse"), ("pros", "cons"), ("advantages", "disadvantages"),
    ("left", "right"), ("inside", "outside"), ("first", "last"), ("read", "write"), ("sync", "async"),
    ("synchronous", "asynchronous"), ("client", "server"), ("lower", "upper"), ("lowercase", "uppercase"),
    ("include", "exclude"), ("allow", "deny"), ("allow", "block"), ("accept", "reject"), ("win", "lose"),
    ("hot", "cold"), ("fast", "slow"), ("faster", "slower"), ("cheap", "expensive"), ("cheaper", "pricier"),
    ("male", "female"), ("men", "women"), ("man", "woman"), ("boy", "girl"), ("north", "south"),
    ("east", "west"), ("install", "uninstall"), ("connect", "disconnect"), ("lock", "unlock"), ("show", "hide"),
    ("safe", "dangerous"), ("safe", "unsafe"), ("legal", "illegal"), ("valid", "invalid"), ("public", "private"),
    ("positive", "negative"), ("high", "low"), ("higher", "lower"), ("large", "small"), ("larger", "smaller"),
    ("big", "small"), ("bigger", "smaller"), ("long", "short"), ("longer", "shorter"), ("old", "new"),
    ("older", "newer"), ("young", "old"), ("early", "late"), ("earlier", "later"), ("begin", "end"),
    ("start", "end"), ("beginning", "end"), ("rise", "fall"), ("gain", "loss"), ("profit", "loss"),
    ("import", "export"), ("mutable", "immutable"), ("static", "dynamic"), ("local", "remote"),
    ("local", "global"), ("horizontal", "vertical"), ("row", "column"), ("rows", "columns"), ("debit", "credit"),
    ("borrow", "lend"), ("send", "receive"), ("husband", "wife"), ("father", "mother"), ("son", "daughter"),
    ("parent", "child"), ("brother", "sister"), ("day", "night"), ("summer", "winter"), ("wet", "dry"),
    ("heavy", "light"), ("dark", "light"), ("strong", "weak"), ("rich", "poor"), ("win", "loss"),
    ("attack", "defend"), ("acquit", "convict"), ("acquitted", "convicted"), ("guilty", "innocent"),
    ("agree", "disagree"), ("like", "dislike"), ("love", "hate"), ("alive", "dead"),
    ("entry", "exit"), ("arrive", "depart"), ("arrival", "departure"), ("inbound", "outbound"),
    ("forward", "backward"), ("forwards", "backwards"), ("ipv4", "ipv6"), ("http", "https"), ("tcp", "udp"),
    ("get", "post"), ("always", "never"), ("all", "none"), ("everyone", "nobody"), ("same", "different"),
    ("similar", "different"), ("plus", "minus"), ("add", "subtract"), ("multiply", "divide"),
    ("sum", "difference"), ("sum", "product"), ("mean", "median"), ("average", "median"), ("union", "intersection"),
    ("before", "since"), ("inner", "outer"), ("left", "inner"), ("merge", "rebase"), ("break", "continue"),
    ("shallow", "deep"), ("soft", "hard"), ("stack", "queue"), ("list", "tuple"), ("list", "set"),
    ("list", "dict"), ("array", "object"), ("string", "int"), ("string", "integer"), ("int", "float"),
    ("string", "list"), ("seconds", "milliseconds"), ("row", "col"), ("width", "height"),
)

_UNITS = frozenset({
    "km", "kilometer", "kilometers", "kilometre", "kilometres", "m", "meter", "meters", "metre", "metres", "cm",
    "centimeter", "centimeters", "mm", "millimeter", "millimeters", "mile", "miles", "mi", "yard", "yards",
    "foot", "feet", "ft", "inch", "inches", "kg", "kilogram", "kilograms", "g", "gram", "grams", "mg",
    "lb", "lbs", "pound", "pounds", "oz", "ounce", "ounces", "ton", "tons", "tonne", "tonnes", "l", "liter",
    "liters", "litre", "litres", "ml", "gallon", "gallons", "cup", "cups", "celsius", "fahrenheit", "kelvin",
    "°c", "°f", "c", "f", "mph", "kph", "kmh", "knots", "seconds", "sec", "secs", "s", "ms",
    "millisecond", "milliseconds", "microseconds", "minute", "minutes", "min", "mins", "hour", "hours", "hr",
    "hrs", "day", "days", "week", "weeks", "month", "months", "year", "years", "decade", "decades", "century",
    "centuries", "byte", "bytes", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib", "bit", "bits", "kbps",
    "mbps", "gbps", "hz", "khz", "mhz", "ghz", "watt", "watts", "w", "kw", "kwh", "mw", "volt", "volts", "v",
    "amp", "amps", "ampere", "joule", "joules", "calorie", "calories", "kcal", "psi", "bar", "pascal", "pa",
    "atm", "acre", "acres", "hectare", "hectares", "percent", "%", "usd", "eur", "gbp", "jpy", "dollar",
    "dollars", "euro", "euros", "pound sterling", "yen", "$", "€", "£", "¥", "degrees", "degree", "radians",
    "radian",
})

# vocabulary that names a distinct thing even in lower case: programming languages, libraries, platforms,
# natural languages. Two questions that differ here want different answers however close their embeddings.
_TECH_TERMS = frozenset({
    "python", "python2", "python3", "javascript", "js", "typescript", "java", "c++", "cpp", "c#",
    "csharp", "golang", "rust", "ruby", "php", "perl", "swift", "kotlin", "scala", "haskell", "elixir", "erlang",
    "clojure", "lua", "dart", "julia", "matlab", "fortran", "cobol", "sql", "bash", "zsh", "powershell",
    "html", "css", "scss", "json", "yaml", "toml", "xml", "csv", "markdown", "latex",
    "pandas", "polars", "numpy", "scipy", "sklearn", "scikit-learn", "pytorch", "torch", "tensorflow", "keras",
    "jax", "react", "vue", "angular", "svelte", "jquery", "nodejs", "deno", "django", "flask",
    "fastapi", "rails", "nextjs", "laravel", "postgres", "postgresql", "mysql", "sqlite",
    "mariadb", "mongodb", "redis", "cassandra", "dynamodb", "elasticsearch", "kafka", "rabbitmq",
    "spark", "hadoop", "dask", "linux", "ubuntu", "debian", "centos", "fedora", "windows", "macos",
    "osx", "ios", "android", "docker", "podman", "kubernetes", "k8s", "helm", "terraform", "ansible", "aws",
    "gcp", "azure", "git", "svn", "mercurial", "npm", "yarn", "pnpm", "pip", "conda", "poetry", "cargo",
    "maven", "gradle", "vim", "emacs", "vscode", "excel", "chrome", "firefox", "safari",
    "nginx", "apache", "webpack", "vite", "graphql", "grpc", "http", "https", "tcp", "udp", "ssh",
    "english", "french", "german", "spanish", "italian", "portuguese", "dutch", "russian", "chinese",
    "mandarin", "cantonese", "japanese", "korean", "arabic", "hindi", "bengali", "urdu", "turkish", "polish",
    "swedish", "norwegian", "danish", "finnish", "greek", "hebrew", "latin", "thai", "vietnamese",
    "indonesian", "ukrainian", "czech", "hungarian", "romanian", "persian", "swahili",
    # dates and colours: a different day or colour is a different question, whatever the capitals say
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february",
    "march", "april", "june", "july", "august", "september", "october", "november", "december",
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white",
    "gray", "grey", "silver", "gold",
})

_SMALL_NUMBERS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
    "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000",
    "million": "1000000", "billion": "1000000000", "first": "1st", "second": "2nd", "third": "3rd",
    "fourth": "4th", "fifth": "5th", "half": "0.5", "twice": "x2", "double": "x2", "triple": "x3",
    "dozen": "12",
}

# relation words across which the order of two things is the meaning ("convert A to B", "is A bigger than B")
_ASYMMETRIC = frozenset({"to", "into", "than", "from", "before", "after", "vs", "versus",
                         "onto", "towards", "toward", "against", "beat", "beats", "defeated",
                         "bigger", "smaller", "larger", "older", "younger", "taller", "faster", "slower",
                         "better", "worse", "more", "less", "greater"})
_STOP = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "do", "does", "did", "of", "in", "on",
    "at", "to", "for", "with", "and", "or", "but", "if", "then", "so", "as", "by", "it", "its", "this", "that",
    "these", "those", "i", "you", "he", "she", "we", "they", "me", "my", "your", "our", "their", "his", "her",
    "what", "which", "who", "whom", "whose", "when", "where", "why", "how", "can", "could", "should", "would",
    "will", "shall", "may", "might", "must", "there", "here", "from", "into", "than", "about", "some", "any",
    "much", "many", "very", "just", "also", "please", "tell", "explain", "give", "show", "s", "t", "use",
    "using", "way", "ways", "best", "get", "make", "let", "like", "need", "want", "know", "one", "thing",
})

_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+#'’\-\.]*[A-Za-z0-9+#]|[A-Za-z]"
                    r"|\d+(?:[.,]\d+)*(?:st|nd|rd|th)?|[%$€£¥°]")
_NUMBER = re.compile(r"(?<![A-Za-z])[-+]?\d+(?:[.,]\d+)*(?:st|nd|rd|th)?")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|‘([^’]+)’|`([^`]+)`|(?<![A-Za-z])'([^']+)'(?![A-Za-z])")
_SENT_END = re.compile(r"[.!?:;]\s*$")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


# spellings of one thing, folded before comparing so "int" and "integer" are not "different terms"
_SYNONYMS = {"integer": "int", "integers": "int", "ints": "int", "strings": "string", "str": "string",
             "lists": "list", "dictionary": "dict", "dictionaries": "dict", "dicts": "dict", "arrays": "array",
             "tuples": "tuple", "floats": "float", "js": "javascript", "py": "python", "postgres": "postgresql",
             "golang": "go", "k8s": "kubernetes", "raises": "raise", "lowers": "lower"}


def _lower_words(text: str) -> list[str]:
    # apostrophes dropped so "isn't" and "isnt" are one negation, possessives folded ("France's" -> "france")
    out = []
    for tok in _tokens(text):
        w = tok.lower().replace("’", "'")
        if w.endswith("'s"):
            w = w[:-2]
        w = w.replace("'", "")
        out.append(_SYNONYMS.get(w, w))
    return out


def _numbers(text: str) -> list[str]:
    nums = []
    for m in _NUMBER.finditer(text):
        raw = m.group(0).replace(",", "")
        try:
            val = float(re.sub(r"(st|nd|rd|th)$", "", raw))
            suffix = re.search(r"(st|nd|rd|th)$", raw)
            nums.append(f"{val:g}{'th' if suffix else ''}")
        except ValueError:
            nums.append(raw)
    for w in _lower_words(text):
        if w in _SMALL_NUMBERS:
            v = _SMALL_NUMBERS[w]
            nums.append(v if not v.endswith(("st", "nd", "rd")) else f"{v[:-2]}th")
    return sorted(nums)


def _entities(text: str) -> list[str]:
    """Capitalised words not at a sentence start, acronyms, CamelCase, tech/language names: lower-cased, in
    order of first appearance."""
    seen: list[str] = []
    words = [t for t in _TOKEN.findall(text)[1:] if t[:1].isalpha() and len(t) > 3]
    # Title Case Headline: capitals carry no information, only acronyms / tech names / CamelCase count
    title_case = len(words) >= 4 and sum(t[:1].isupper() for t in words) >= 0.75 * len(words)
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        low = tok.lower().replace("’", "'")
        if low.endswith("'s"):
            low = low[:-2]
            tok = tok[:-2]
        low = low.replace("'", "")
        before = text[: m.start()]
        sentence_start = not before.strip() or bool(_SENT_END.search(before))
        is_entity = False
        if low in _TECH_TERMS:
            is_entity = True
        elif title_case:
            is_entity = (len(tok) > 1 and tok.isupper() and tok.isalpha()) or bool(re.search(r"[a-z][A-Z]", tok))
        elif tok[:1].isupper() and not sentence_start and low not in _STOP and low != "i":
            is_entity = True
        elif len(tok) > 1 and tok.isupper() and tok.isalpha():
            is_entity = True  # acronyms, even at a sentence start
        elif re.search(r"[a-z][A-Z]", tok):
            is_entity = True  # CamelCase / camelCase identifiers
        elif sentence_start and tok[:1].isupper() and low not in _STOP and low not in _COMMON_OPENERS:
            is_entity = True  # "Paris is ...": a sentence-initial capital that is not a function word
        if is_entity and low not in seen:
            seen.append(low)
    return seen


# sentence-initial words that are capitalised only because they open the sentence
_COMMON_OPENERS = frozenset({
    "a", "an", "the", "how", "what", "why", "when", "where", "who", "which", "is", "are", "can", "could",
    "should", "would", "will", "do", "does", "did", "please", "explain", "describe", "tell", "give", "list",
    "write", "show", "convert", "translate", "summarize", "summarise", "define", "compare", "find", "make",
    "create", "generate", "calculate", "compute", "sort", "i", "my", "in", "on", "for", "with", "if", "there",
    "it", "this", "that", "some", "any", "name", "help", "was", "were", "has", "have", "may", "shall", "let",
    "two", "three", "one", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several", "no",
    "not", "get", "set", "use", "using", "what's", "whats", "how's", "hows", "men", "women", "man", "woman",
    "people", "someone", "somebody", "after", "before", "at", "from", "by", "as", "all", "most", "best",
})


def _quoted(text: str) -> list[str]:
    # case kept: 'HeLLo' and 'hello' are different strings to count letters in, sort or grep for
    return sorted(_norm_ws(next(g for g in m.groups() if g is not None)) for m in _QUOTED.finditer(text))


def _units(words: list[str], text: str) -> list[str]:
    found = {w for w in words if w in _UNITS}
    found |= {s for s in ("%", "$", "€", "£", "¥", "°c", "°f") if s in text.lower()}
    # single letters double as units only right after a number ("5 m", "30 C"); elsewhere they are words
    singles = {"m", "g", "l", "c", "f", "s", "w", "v"}
    found -= singles
    for m in re.finditer(r"\d\s*([A-Za-z°%]+)\b", text):
        u = m.group(1).lower()
        if u in _UNITS:
            found.add(u)
    return sorted(_canon_unit(u) for u in found)


_UNIT_CANON = {
    "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km", "meter": "m", "meters": "m",
    "metre": "m", "metres": "m", "mile": "mi", "miles": "mi", "kilogram": "kg", "kilograms": "kg", "lbs": "lb",
    "pound": "lb", "pounds": "lb", "gram": "g", "grams": "g", "liter": "l", "liters": "l", "litre": "l",
    "litres": "l", "celsius": "c", "°c": "c", "fahrenheit": "f", "°f": "f", "feet": "ft", "foot": "ft",
    "inches": "in", "inch": "in", "seconds": "s", "second": "s", "sec": "s", "secs": "s", "minutes": "min",
    "minute": "min", "mins": "min", "hours": "h", "hour": "h", "hr": "h", "hrs": "h", "days": "day",
    "weeks": "week", "months": "month", "years": "year", "percent": "%", "dollar": "$", "dollars": "$",
    "usd": "$", "euro": "€", "euros": "€", "eur": "€", "gbp": "£", "yen": "¥", "jpy": "¥", "degrees": "degree",
    "bytes": "byte", "milliseconds": "ms", "millisecond": "ms",
}


def _canon_unit(u: str) -> str:
    return _UNIT_CANON.get(u, u)


def _occurrences(words: list[str]) -> dict[tuple[str, int], int]:
    seen: dict[str, int] = {}
    out = {}
    for i, w in enumerate(words):
        n = seen.get(w, 0)
        seen[w] = n + 1
        out[(w, n)] = i
    return out


def _swapped(qw: list[str], cw: list[str], key_terms: set[str]) -> tuple[str, str] | None:
    """Two words both texts contain (matched occurrence by occurrence) in opposite order, where the order
    carries meaning: a pair of key terms (names, numbers, units, tech) or any content-word pair with an
    asymmetric relation word ("to", "than", "from", ...) between them."""
    qo, co = _occurrences(qw), _occurrences(cw)
    shared = [t for t in qo if t in co and t[0] not in _STOP]
    if len(shared) < 2:
        return None
    shared.sort(key=qo.get)
    for i, a in enumerate(shared):
        for b in shared[i + 1:]:
            if a[0] == b[0] or co[a] < co[b]:
                continue
            if a[0] in key_terms and b[0] in key_terms:
                return a[0], b[0]
            between = set(qw[qo[a] + 1: qo[b]]) | set(cw[co[b] + 1: co[a]])
            if between & _ASYMMETRIC:
                return a[0], b[0]
    return None


def guard(query: str, candidate: str) -> str | None:
    """A reason to reject ``candidate`` (a cached prompt) as an answer source for ``query`` even though their
    embeddings are close; None to accept. Each check compares one feature an embedding blurs."""
    if _norm_ws(query) == _norm_ws(candidate):
        return None
    if "\n" in _norm_ws(query) or "\n" in _norm_ws(candidate):
        # code and pasted documents: layout is meaning (indentation) and the embedding blurs both
        return "multi-line prompts match exactly or not at all"
    qw, cw = _lower_words(query), _lower_words(candidate)
    qset, cset = set(qw), set(cw)

    # how many negations, not which words: "weren't" and "were not" are one negation each
    qn, cn = [w for w in qw if w in _NEGATIONS], [w for w in cw if w in _NEGATIONS]
    if len(qn) != len(cn):
        return f"negation differs ({qn or '-'} vs {cn or '-'})"
    qnum, cnum = _numbers(query), _numbers(candidate)
    if qnum != cnum:
        return f"numbers differ ({qnum} vs {cnum})"
    qq, cq = _quoted(query), _quoted(candidate)
    if qq != cq:
        return "quoted strings differ"
    qu, cu = _units(qw, query), _units(cw, candidate)
    if qu != cu:
        return f"units differ ({qu} vs {cu})"
    qe, ce = _entities(query), _entities(candidate)
    # a name on one side that the other side never mentions, in any case: "python" and "Python" are one name,
    # "Paris" and "London" are not
    only = sorted({e for e in qe if e not in cset} | {e for e in ce if e not in qset})
    if only:
        return f"names differ ({only})"
    for pair in _ANTONYMS:
        qa = {w for w in pair if w in qset}
        ca = {w for w in pair if w in cset}
        if qa and ca and qa != ca:
            return f"opposite terms ({'/'.join(sorted(qa))} vs {'/'.join(sorted(ca))})"
    key_terms = set(qe) | {w for w in qw if any(ch.isdigit() for ch in w)} | set(qu)
    swap = _swapped(qw, cw, key_terms)
    if swap:
        return f"order swapped ({swap[0]} / {swap[1]})"
    return None


# all-MiniLM-L6-v2 reads 256 word pieces and drops the rest; ~3 characters a piece keeps well inside that
SEMANTIC_MAX_CHARS = 700


def semantic_eligible(prompt: str) -> bool:
    """Whether a prompt is short enough for its embedding to stand for all of it."""
    return len(prompt) <= SEMANTIC_MAX_CHARS
