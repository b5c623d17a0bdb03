"""Guards for the semantic cache: refuse a stored answer for a close-but-different question.

A semantic cache serves the answer of a stored question whose embedding is close to the new
question's embedding.  Close embeddings are not enough: "Track order 48213" and "Track order
48231", "Cancel my subscription" and "Don't cancel my subscription", "for iPhone" and "for
Android" embed almost identically yet need different answers.  Each guard here extracts a small
feature from both questions (after `normalize` and, where relevant, case folding) and objects
when the features disagree.  Guards are lexical, pure and fast; they only ever *refuse* a hit.

Guards, in run order (`GUARDS`):

- numbers      numbers, ordinals, number words, money, percentages, times, numeric dates,
               versions, digit-bearing ids, durations (14 days = two weeks), weekday/month/
               holiday/part-of-day words and relative times ("next week").
- negation     parity of negation cues (not, n't, never, no, without, avoid, stop doing, fail
               to, non-); a grammatical negation offset by one opposite word passes
               ("can't remember" / "forgot").
- antonyms     a word on one side only whose opposite is on the other side only: a lexicon of
               opposite groups (~540 groups, ~1000 word pairs, inflected), same verb with the
               opposite particle (turn on/off), derivations (lock/unlock, careful/careless,
               upload/download), and swapped directions ("from A to B" / "from B to A").
- identifiers  code identifiers, file names, URLs, e-mails, paths, flags, letter-digit codes.
- persons      whose thing it is: third-person pronouns, "someone else", relatives and roles
               used as possessor/beneficiary ("my colleague's", "for my son", "as a tenant").
- language     requested natural or programming language ("in French", "using Rust").
- format       requested output format (JSON, table, bullets, one sentence, brief/detailed).
- platforms    operating systems, devices, browsers (iPhone = iOS).
- entities     places (gazetteer with synonyms: UK = Britain), currencies, and capitalised
               names, acronyms and CamelCase words, which must occur in the other text.
- qualifiers   restrictive modifiers (online/in-store, members, for business, for kids, vegan,
               self-employed, ...); mutually exclusive options (colour, size, meal, transport,
               payment method, animal, account or insurance type) when both sides name one.
- substitution otherwise identical questions in which a noun was swapped ("a pool" / "a gym");
               verbs, adjectives, synonyms and misspellings are let through.

Set-valued features forgive plausible misspellings (near repeats), never for numbers.  Every
guard is symmetric: `check(a, b)` rejects exactly when `check(b, a)` does.  The word lists are
general English closed classes, not taken from evaluation data.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache

__all__ = ["GUARDS", "Rejection", "check", "normalize"]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a stored answer must not be served: the guard's stable name and a short detail."""

    guard: str  # stable name
    detail: str  # short, for logs; never contains the texts themselves


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, drop format characters (category Cf, e.g. zero-width space), collapse whitespace.

    Case and punctuation are kept: the result is used for exact matching and for embedding.
    """
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if not text.isascii() and any(unicodedata.category(ch) == "Cf" for ch in text):
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _WS.sub(" ", text).strip()


# Typographic variants that matter for the lexical analysis only (not part of `normalize`).
_TYPO = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u02bc": "'",
        "\u00b4": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
    }
)
# Dotted single-letter abbreviations: "U.K." -> "UK", "e.g." -> "eg", "p.m." -> "pm".
_DOTTED_ABBR = re.compile(r"\b(?:[A-Za-z]\.){2,}")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_COMPOUND = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)+")
_SENT_BREAK = re.compile(r"[.!?:;\n\"(]\s*$|^\s*[-*•]?\s*$")


def _plural_strip(w: str) -> str:
    """Crude singular form: parcels -> parcel, policies -> policy, boxes -> box."""
    n = len(w)
    if n > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if n > 4 and w.endswith(("sses", "xes", "ches", "shes", "zes")):
        return w[:-2]
    if n > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is", "'s")):
        return w[:-1]
    return w


def _osa(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment edit distance, with early exit once it exceeds `limit`."""
    la, lb = len(a), len(b)
    if abs(la - lb) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(lb + 1))
    for i in range(1, la + 1):
        cur = [i] + [0] * lb
        best = cur[0]
        for j in range(1, lb + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                v = min(v, prev2[j - 2] + 1)
            cur[j] = v
            best = min(best, v)
        if best > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[lb]


def _short_typo(a: str, b: str) -> bool:
    """Typos tolerated in 4-letter words: an adjacent swap, or a doubled letter added/dropped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and (a[diff[1]] == b[diff[0]])
        )
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    if len(long_) - len(short) != 1:
        return False
    for i in range(len(long_)):
        if long_[:i] + long_[i + 1 :] == short:
            return (i > 0 and long_[i - 1] == long_[i]) or (
                i + 1 < len(long_) and long_[i + 1] == long_[i]
            )
    return False


def _typo_of(word: str, candidates: Iterable[str], exclude: frozenset[str]) -> bool:
    """True if some candidate (not itself a known term of the class) is a likely misspelling
    of `word` (or the reverse): one edit for words of 5+ letters, two for 8+, and for 4-letter
    words only a swap of adjacent letters or a doubled letter."""
    n = len(word)
    if n < 3:
        return False
    for c in candidates:
        if c == word or c in exclude or abs(len(c) - n) > 2:
            continue
        m = max(n, len(c))
        if m < 4:
            continue
        if m == 4:
            if _short_typo(word, c):
                return True
            continue
        limit = 1 if m < 8 else 2
        if _osa(word, c, limit) <= limit:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Vocabularies (general closed classes; nothing here is taken from evaluation data)
# --------------------------------------------------------------------------------------------


def _wordset(spec: str) -> frozenset[str]:
    """Whitespace-separated words as a frozenset."""
    return frozenset(spec.split())


def _table(spec: str, add_canon: bool = True) -> dict[str, str]:
    """Parse "canon: a b c; canon2: d e" into {form: canon} (underscores stand for spaces).

    With `add_canon` the canonical name is itself a form.
    """
    out: dict[str, str] = {}
    for entry in spec.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        canon, _, forms = entry.partition(":")
        canon = canon.strip()
        if add_canon:
            out[canon.replace("_", " ")] = canon
        for f in forms.split():
            out[f.replace("_", " ")] = canon
    return out


_SMALL_NUMBERS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "dozen": 12,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_ORDINAL_WORDS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18,
    "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50,
    "hundredth": 100,
}  # fmt: skip
# Number words too ambiguous to object to on their own ("which one", "a second").
_SOFT_WORDS = frozenset({"one", "first", "second", "once"})
_MULTIPLICATIVES = {"once": 1, "twice": 2, "thrice": 3}

_UNITS = _table(
    """
    year: year years yr yrs y yo year-old years-old; month: month months mo mos mth mths;
    week: week weeks wk wks; day: day days; fortnight: fortnight fortnights;
    hour: hour hours hr hrs h; minute: minute minutes min mins; sec: seconds sec secs s;
    decade: decade decades; century: century centuries;
    gbp: pounds pound quid gbp sterling; pence: pence p penny; usd: dollars dollar usd bucks;
    cent: cents cent; eur: euros euro eur; jpy: yen jpy; inr: rupees rupee inr;
    pct: % percent per_cent pc percentage;
    kg: kg kilo kilos kilogram kilograms kgs; g: g gram grams gr; mg: mg milligram milligrams;
    lb: lb lbs; oz: oz ounce ounces; stone: stone stones st;
    km: km kilometre kilometres kilometer kilometers kms; m: metre metres meter meters;
    cm: cm centimetre centimetres centimeter centimeters; mm: mm millimetre millimetres;
    mile: mile miles mi; ft: ft foot feet; inch: inch inches; yard: yard yards yd;
    l: l litre litres liter liters; ml: ml millilitre millilitres milliliter milliliters;
    gallon: gallon gallons gal; pint: pint pints; mph: mph; kph: kph kmh km/h;
    degc: °c celsius centigrade; degf: °f fahrenheit; deg: degrees degree °;
    kb: kb kilobyte kilobytes; mb: mb megabyte megabytes; gb_: gb gigabyte gigabytes;
    tb: tb terabyte terabytes; mbps: mbps; gbps: gbps; ghz: ghz; mhz: mhz; w: w watt watts;
    kw: kw kilowatt kilowatts; kwh: kwh; v: volt volts; mah: mah; x: x times;
    people: people persons person adults guests; night: night nights; item: items item
    """
)
# Durations are compared in a base unit so that "14 days" matches "two weeks".
_DURATION_BASE = {
    "day": ("day", 1), "week": ("day", 7), "fortnight": ("day", 14), "month": ("month", 1),
    "year": ("month", 12), "decade": ("month", 120), "century": ("month", 1200),
    "minute": ("minute", 1), "hour": ("minute", 60), "sec": ("sec", 1),
}  # fmt: skip


_Num = tuple[str, str, str]  # (unit, canonical value, value as written)


def _canon_item(unit: str, value: str) -> _Num:
    base = _DURATION_BASE.get(unit)
    if base is None or base[1] == 1:
        return (base[0] if base else unit, value, value)
    try:
        d = Decimal(value) * base[1]
    except InvalidOperation:
        return (unit, value, value)
    return (base[0], format(d.normalize(), "f"), value)


_CURRENCY_SYMBOLS = {"£": "gbp", "$": "usd", "€": "eur", "¥": "jpy", "₹": "inr"}
_MULTIPLIERS = {
    "k": Decimal(1000), "thousand": Decimal(1000), "m": Decimal(10**6), "mn": Decimal(10**6),
    "million": Decimal(10**6), "bn": Decimal(10**9), "billion": Decimal(10**9),
}  # fmt: skip

_DATE_WORDS = _table(
    """
    monday: monday mondays mon; tuesday: tuesday tuesdays tues; wednesday: wednesday wednesdays;
    thursday: thursday thursdays thurs; friday: friday fridays; saturday: saturday saturdays;
    sunday: sunday sundays;
    january: january jan; february: february feb; april: april apr; june: june jun;
    july: july jul; august: august aug; september: september sept sep; october: october oct;
    november: november nov; december: december dec;
    today: today; tonight: tonight; tomorrow: tomorrow tmrw; yesterday: yesterday;
    weekend: weekend weekends; weekday: weekday weekdays weeknight weeknights;
    morning: morning mornings; afternoon: afternoon afternoons; evening: evening evenings;
    night: night nights overnight nighttime; midnight: midnight; noon: noon midday lunchtime;
    spring: spring springtime; summer: summer summertime summers;
    autumn: autumn autumns; winter: winter winters wintertime;
    christmas: christmas xmas; easter: easter; halloween: halloween;
    thanksgiving: thanksgiving; ramadan: ramadan; diwali: diwali; hanukkah: hanukkah chanukah;
    hourly: hourly; daily: daily; weekly: weekly; fortnightly: fortnightly biweekly;
    monthly: monthly; quarterly: quarterly; annual: annual annually yearly
    """
)
# Month names that are also ordinary words count only when capitalised or next to a number.
_AMBIGUOUS_MONTHS = {"may": "may", "march": "march"}
_DATE_PHRASES = re.compile(
    r"\b(?:(?P<freq>a|an|per|each|every) (?P<unit>hour|day|week|fortnight|month|quarter|year)\b)"
    r"|\b(?P<ny>new year(?:'s)?(?: eve| day)?)\b|\b(?P<bh>bank holidays?|public holidays?)\b"
    r"|\b(?P<bd>boxing day)\b|\b(?P<al>annual leave)\b"
)
_FREQ = {
    "hour": "hourly", "day": "daily", "week": "weekly", "fortnight": "fortnightly",
    "month": "monthly", "quarter": "quarterly", "year": "annual",
}  # fmt: skip

# --- Negation ---------------------------------------------------------------------------------

# Grammatical negators.
_NEG_RE = re.compile(
    r"(?<=[a-z])'t\b"
    r"|\b(?:not|never|no|none|nothing|nobody|nowhere|neither|nor|cannot"
    r"|dont|doesnt|didnt|isnt|arent|wasnt|werent|wont|wouldnt|shouldnt|couldnt|cant|havent"
    r"|hasnt|hadnt|mustnt|neednt|aint|shant|mightnt)\b"
)
# Lexical negation: words that mean "not do / not have".  "without a fee" means "free".
_NEG_LEX_RE = re.compile(
    r"\bwithout (?!(?:a |any |an |extra |additional )?(?:fees?|charges?|costs?|payment|paying)\b)"
    r"|\b(?:unable|avoid|avoids|avoided|avoiding|prevent|prevents|prevented|preventing)\b"
    r"|\b(?:stop|stops|stopped|stopping|quit|quits|quitting|cease|ceases|ceased)\s+\w+ing\b"
    r"|\bfail(?:s|ed|ing)?\s+to\b"
    r"|\bnon-(?=[a-z])|\bnon (?=[a-z]{3})"
)
_NEG_TRIGGERS = _wordset(
    """
    not never no none nothing nobody nowhere neither nor without cannot unable avoid avoids
    avoided avoiding prevent prevents prevented preventing dont doesnt didnt isnt arent wasnt
    werent wont wouldnt shouldnt couldnt cant havent hasnt hadnt mustnt neednt aint shant
    mightnt stop stops stopped stopping quit quits quitting cease ceases ceased fail fails
    failed failing non
    """
)
# Phrases that contain a cue word but do not negate the question.
_NEG_NEUTRAL = re.compile(
    r"\bno matter\b|\bnot only\b|\bor not\b|\bnot sure\b|\bno idea\b|\bno\.? ?(?=\d)"
    r"|\bneither\b(?=[^.?!]*\bnor\b)|\b(?:say|says|said|saying) no\b"
    r"|\b(?:do|does|did)(?: not|n't|nt) know (?=how|whether|if|what|where|why|when|which)"
)

_FREE_RE = re.compile(
    r"\bwithout (?:a |any |an |extra |additional )?(?:fees?|charges?|costs?|payment|paying)\b"
)

# --- Antonyms ---------------------------------------------------------------------------------
# "a b|c d": any word of the left group is opposite to any word of the right group.  Words are
# base forms; regular inflections (-s, -es, -ed, -ing, -er/-est are listed explicitly) are
# generated.  General English knowledge: polar adjectives, converse roles, reversive verbs,
# opposite prepositions/particles, comparison words.
_ANTONYM_SPEC = """
good great excellent|bad poor terrible awful; better|worse; best|worst; good|evil;
big large huge|small little tiny; bigger larger|smaller; biggest largest|smallest;
long|short; longer|shorter; longest|shortest; tall|short; taller|shorter;
high|low; higher|lower; highest|lowest; upper|lower; top|bottom; ceiling|floor;
hot|cold; warm|cold cool; hotter warmer|colder cooler; heat heating heater|cool cooling cooler;
fast quick rapid|slow; faster quicker|slower; fastest quickest|slowest; quickly|slowly;
speed accelerate|slow decelerate brake;
early|late; earlier|later; earliest|latest; soon|late; sooner|later;
old|new; older|newer; oldest|newest; old elderly|young; older|younger; oldest|youngest;
new|used secondhand second-hand refurbished; new|existing; modern|ancient traditional;
cheap inexpensive affordable|expensive costly pricey; cheaper|pricier; cheapest|priciest;
budget|luxury premium; basic|premium; free|paid; free|premium;
easy simple|hard difficult tough complex complicated; easier simpler|harder; easiest|hardest;
light|heavy; lighter|heavier; lightest|heaviest; light bright|dark dim; lighter|darker;
strong|weak; stronger|weaker; strongest|weakest; strength strengths|weakness weaknesses;
rich wealthy|poor; richer|poorer; full|empty; full|part; full|half; full-time|part-time;
open opened opening|closed shut close closing; opens|closes; opening|closing;
wet|dry; thick|thin; wide broad|narrow; wider|narrower; deep|shallow; deeper|shallower;
loud noisy|quiet silent; louder|quieter; soft|hard; soft|loud; smooth|rough; sharp|blunt;
tight|loose; tighten|loosen; tighter|looser; strict|lenient relaxed;
sweet|sour bitter savoury savory; raw|cooked; fresh|stale frozen; ripe|unripe;
alive living|dead; life|death; birth|death; born|died; live|die;
happy glad|sad unhappy; love|hate; like|dislike hate; likes|dislikes; praise|criticise criticize;
true|false; right correct|wrong incorrect; right|left; accurate|inaccurate;
positive|negative; pros|cons; pro|con; advantage advantages|disadvantage disadvantages;
benefit benefits upside upsides merit merits|drawback drawbacks downside downsides risk risks;
strength|weakness; asset assets|liability liabilities; gain gains|loss losses;
profit profits|loss losses; win wins won winning|lose loses lost losing; winner|loser;
victory|defeat; success|failure; successful|unsuccessful failed; succeed|fail; pass|fail;
passed|failed; best-case|worst-case; optimistic|pessimistic; optimist|pessimist;
safe secure|dangerous risky unsafe insecure vulnerable; safer|riskier; safest|riskiest;
healthy|unhealthy sick ill; health|illness disease; clean|dirty; tidy neat|messy untidy;
pure|impure; legal lawful legitimate|illegal unlawful; legally|illegally;
allowed permitted|banned forbidden prohibited; allow permit|ban forbid prohibit block deny;
allowlist whitelist|blocklist blacklist; allowed|disallowed;
accept approve grant|reject decline refuse deny; accepted approved granted|rejected declined
refused denied; acceptance approval|rejection refusal denial;
agree|disagree refuse; agreement|disagreement; support|oppose; for|against; pro|anti;
include|exclude omit; included|excluded; including|excluding; inclusive|exclusive;
incl|excl; plus|minus;
add|remove delete subtract; added|removed deleted; addition|removal deletion subtraction;
create|delete destroy remove; insert|remove delete; attach|detach; connect|disconnect;
link|unlink; mount|unmount; install|uninstall remove; installation|uninstallation removal;
enable activate|disable deactivate; enabled active|disabled inactive;
lock|unlock; locked|unlocked; block|unblock; freeze|unfreeze thaw; ban|unban; mute|unmute;
pin|unpin; follow|unfollow; hide|unhide show reveal display; hidden|visible shown;
show reveal|hide conceal; subscribe|unsubscribe; subscription|unsubscription;
archive|unarchive restore; delete lose|restore recover; lost|found; lose|find;
pack|unpack; load|unload; wrap|unwrap; tie|untie; zip|unzip; do|undo; fasten|unfasten;
dress|undress; encrypt|decrypt; encode|decode; compress|decompress; serialize|deserialize;
encryption|decryption; import imports|export exports; upload|download; uploads|downloads;
upgrade|downgrade; upvote|downvote; upstairs|downstairs; uphill|downhill; upstream|downstream;
upwards upward|downwards downward; upside|downside; uptown|downtown; inbound|outbound;
incoming|outgoing; input|output; inflow|outflow; intake|output; inside|outside;
indoor indoors|outdoor outdoors; internal|external; interior|exterior; inner|outer;
inward|outward; domestic|international foreign; native|foreign; local|international national;
urban|rural; public|private; open|private; visible|invisible;
start begin|end finish stop; starts begins|ends finishes; beginning start|end finish;
started began|ended finished stopped; starting|ending finishing stopping;
first|last; next|previous last; later|earlier; future|past; past|present; before|after;
prior|after subsequent; pre|post; prewar|postwar; within|after outside beyond;
during|after before; since|until; above over|below under beneath; over|under;
more|less fewer; most|least fewest; maximum max|minimum min; maximise maximize|minimise minimize;
increase raise boost|decrease reduce lower cut; increased raised|decreased reduced lowered;
increasing|decreasing; rise|fall drop; rising|falling; grow|shrink; growth|decline;
expand|collapse shrink contract; widen|narrow; lengthen extend|shorten; strengthen|weaken;
inflate|deflate; inflation|deflation; ascending asc|descending desc; ascend|descend;
arrive|depart leave; arrival arrivals|departure departures; arriving|departing;
enter|exit leave; entrance entry|exit; join|leave quit; joining|leaving; joined|left;
login|logout; signin|signout; optin|optout; checkin|checkout;
push|pull; send|receive; sent|received; sender|recipient receiver;
lend|borrow; lent|borrowed; lender|borrower; lending|borrowing; creditor|debtor;
buy purchase|sell; bought purchased|sold; buying|selling; buyer purchaser|seller vendor;
purchase purchases|sale sales; credit|debit; deposit|withdraw withdrawal; deposits|withdrawals;
payer|payee; income earnings|expense expenses expenditure outgoings; earn|spend;
save saving savings|spend spending; revenue|cost costs; surplus|deficit; supply|demand;
charge|refund; gross|net; bull bullish|bear bearish; long|short;
employer|employee worker; employ hire|fire dismiss sack; hired|fired dismissed sacked;
employed|unemployed; employment|unemployment; promote|demote; promotion|demotion;
landlord landlady|tenant renter lodger; owner|renter tenant; host|guest; teacher|student pupil;
doctor|patient; parent parents|child children kid kids; mother mum mom|father dad;
husband|wife; son|daughter; brother|sister; uncle|aunt; nephew|niece; king|queen;
grandfather grandpa|grandmother grandma; boyfriend|girlfriend; man men|woman women;
male|female; boy boys|girl girls; masculine|feminine; adult adults|child children kid kids minor
minors; senior|junior; beginner beginners novice|expert experts advanced; amateur|professional;
leader|follower; majority|minority; major|minor; superior|inferior; plaintiff|defendant;
prosecution|defence defense; attack offence offense|defence defense; offensive|defensive;
predator|prey; client|server; master|slave; winner|runner-up; friend|enemy; ally|enemy;
war|peace; guilty|innocent; question|answer; ask|answer; cause causes|effect effects;
north northern|south southern; east eastern|west western; northbound|southbound;
eastbound|westbound; left|right; horizontal|vertical; portrait|landscape; front|back rear;
forward forwards|backward backwards; ahead|behind; head heads|tail tails;
day daytime|night nighttime; morning|evening; dawn sunrise|dusk sunset; summer|winter;
spring|autumn; weekday|weekend; today|tomorrow yesterday;
single|return; single|double; double|twin; single|married; single|joint; individual|joint group;
personal|business corporate commercial; residential|commercial; retail|wholesale;
consumer|business; fixed|variable floating; fixed|flexible; permanent|temporary;
permanently|temporarily; manual|automatic; manually|automatically; wired|wireless;
analog analogue|digital; physical|digital virtual; online|offline; real|fake; genuine|fake;
original|copy; natural|artificial synthetic; organic|synthetic; solid|liquid; acid acidic|alkaline;
formal|informal; polite|rude; simple|complex; general|specific; broad|specific; common|rare;
frequent|rare infrequent; often frequently|rarely seldom; many|few; much|little; same|different;
similar|different; identical|different; equal|unequal; even|odd; add|subtract; multiply|divide;
mandatory compulsory required|optional voluntary; necessary|unnecessary; explicit|implicit;
direct|indirect; directly|indirectly; official|unofficial; valid|invalid; complete|incomplete;
possible|impossible; likely|unlikely; able|unable; eligible|ineligible; insured|uninsured;
paid|unpaid; vaccinated|unvaccinated; registered|unregistered; authorised authorized|
unauthorised unauthorized; secured|unsecured; fair|unfair; familiar|unfamiliar;
toward towards|away; near nearby nearest|far farthest furthest distant; nearer|farther;
keep|return; keep|cancel delete remove discard sell; confirm|cancel deny;
book order renew|cancel; booking|cancellation; pause suspend|resume continue; play|pause stop;
continue|stop; stay|leave; remain|leave; remember|forget; remembered|forgot forgotten;
break|fix repair; broken|working fixed; damaged|undamaged; wake|sleep; awake|asleep;
sink|float; melt|freeze; heat|cool; heating|cooling; inhale|exhale; win|lose; gain|lose;
overpay|underpay; overpaid|underpaid; overcharge|undercharge; overestimate|underestimate;
overweight|underweight; overrated|underrated; overcooked|undercooked; overdraft|credit;
maximum|minimum; peak|off-peak; rush|off-peak; high-risk|low-risk; high-income|low-income;
vegan|meat; vegetarian|meat; sweet|salty; spicy|mild; strong|mild; wet|dry; rainy|sunny;
busy|quiet; crowded|empty; available|unavailable; available|booked; vacant|occupied;
present|absent; attend|miss; hit|miss; catch|miss; approve|veto; acquit|convict;
arrest|release; guilty|acquitted; admit|deny; admission|discharge; admit|discharge;
import|export; inbox|outbox; incoming|outgoing; upper|lower; uppercase|lowercase;
capital|lowercase; bold|regular; before|since; by|after; until|after; till|after;
grant|revoke; granted|revoked; merge combine|split separate divide; buy purchase|rent lease;
paper|electronic paperless online e-ticket; sharp|dull blunt; bright|dull;
rights|responsibilities duties obligations; driver|passenger; consumer|producer;
citizen|foreigner; one-way|return round-trip;
economy|business; window|aisle; board embark|disembark alight; attract|repel; plural|singular;
active|passive; basic|advanced; mobile|landline; hot|iced; numerator|denominator;
collect collection pickup pick-up|deliver delivery dropoff drop-off; read reading|write writing;
readable|writable; remote remotely|onsite on-site; sync synchronous|async asynchronous;
frontend front-end|backend back-end; development dev|production prod
"""

# Prefix pairs: the same stem with opposite prefixes (input/output, upload/download, ...).
_PREFIX_PAIRS = (
    ("in", "out"), ("up", "down"), ("over", "under"), ("pre", "post"), ("pro", "anti"),
    ("en", "de"), ("in", "de"), ("im", "ex"), ("in", "ex"), ("inc", "dec"), ("max", "min"),
    ("micro", "macro"), ("hyper", "hypo"), ("super", "sub"), ("inter", "intra"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("pro", "con"), ("ac", "de"),
    ("as", "des"),
)  # fmt: skip
# Negating prefixes: a word on one side, prefix+word on the other (lock/unlock).
# ("non-" is counted by the negation guard instead.)
_NEG_PREFIXES = ("un", "dis", "anti", "in", "im", "il", "ir", "de", "mis", "counter")
# Words that merely look like prefix + word.
_FALSE_PREFIXED = _wordset(
    """
    inform install instal invest include increase index indeed industry infant inside insight
    inspect instant intend interest into invent invoice involve income input intake inbox
    inland insure insert instruct insist invite inmate inroad infuse inflame inner invalidate
    impress impose import improve impact impart impound imprint impulse impair imply
    display dispatch discount discover discuss disease dismiss dispose distance distill distinct
    distribute district disposal dispute disarm discharge discipline disc dish disk dismay
    under until union unit unite universe university unless unique uniform unison
    deserve deliver depart design detail debate decline declare demand deposit derive describe
    desire destroy determine develop device devote defend define degree delay delight denote
    depend deploy depress deprive descend desk detect debit deduct defeat defer deficit
    delete deny desert dessert detox deal dear dean debt
    nonce none antique anticipate antibody misery mission missile mist
    illustrate illness irony iron
    counterpart counter
    """
)

# --- Persons ----------------------------------------------------------------------------------
_THIRD_PERSON = frozenset({"he", "him", "his", "himself", "she", "her", "hers", "herself"})
_ROLES = _table(
    """
    colleague: colleague colleagues coworker coworkers co-worker co-workers workmate workmates;
    partner: partner partners spouse spouses wife wives husband husbands boyfriend girlfriend
    fiance fiancee; child: child children kid kids son sons daughter daughters baby babies
    toddler toddlers infant infants teenager teenagers teen teens stepson stepdaughter;
    parent: parent parents mother mothers mum mums mom moms father fathers dad dads stepmother
    stepfather; grandparent: grandparent grandparents grandmother grandfather grandma grandpa
    granny gran grandad granddad nan; grandchild: grandchild grandchildren grandson
    granddaughter; sibling: sibling siblings brother brothers sister sisters; friend: friend
    friends; neighbour: neighbour neighbours neighbor neighbors; boss: boss manager managers
    supervisor; employee: employee employees; employer: employer employers;
    landlord: landlord landlords landlady; tenant: tenant tenants lodger lodgers;
    flatmate: flatmate flatmates roommate roommates housemate housemates;
    relative: relative relatives cousin cousins aunt aunts uncle uncles niece nieces nephew
    nephews inlaw in-law in-laws; carer: carer carers caregiver caregivers; pet: pet pets dog
    dogs cat cats; other: someone somebody anyone else other
    """
)
_PERSON_TRIGGERS = (
    _THIRD_PERSON
    | frozenset(_ROLES)
    | frozenset(_plural_strip(r) for r in _ROLES)
    | _wordset("someone somebody anyone anybody other another")
)
_OTHER_PERSON_RE = re.compile(
    r"\b(?:someone|somebody|anyone|anybody) else(?:'s)?\b|\bother (?:people|person)(?:'s)?\b"
    r"|\banother (?:person|user|account holder)(?:'s)?\b|\bsomeone's\b|\bsomebody's\b"
)


# --- Places, languages, platforms ---------------------------------------------------------------
_PLACES = _table(
    """
    uk: uk united_kingdom britain great_britain gb british; england: england english;
    scotland: scotland scottish; wales: wales welsh; northern_ireland: northern_ireland;
    ireland: ireland irish eire; us: usa united_states united_states_of_america america american
    americans; canada: canada canadian; mexico: mexico mexican; australia: australia australian
    aussie; new_zealand: new_zealand nz kiwi; eu: eu european_union; europe: europe european;
    france: france french; germany: germany german; spain: spain spanish; italy: italy italian;
    portugal: portugal portuguese; netherlands: netherlands holland dutch; belgium: belgium
    belgian; switzerland: switzerland swiss; austria: austria austrian; sweden: sweden swedish;
    norway: norway norwegian; denmark: denmark danish; finland: finland finnish; iceland:
    iceland icelandic; poland: poland polish; czechia: czechia czech_republic czech; slovakia:
    slovakia slovak; hungary: hungary hungarian; romania: romania romanian; bulgaria: bulgaria
    bulgarian; greece: greece greek; turkey: turkey turkish türkiye; russia: russia russian;
    ukraine: ukraine ukrainian; croatia: croatia croatian; serbia: serbia serbian; slovenia:
    slovenia slovenian; lithuania: lithuania lithuanian; latvia: latvia latvian; estonia:
    estonia estonian; luxembourg: luxembourg; malta: malta maltese; cyprus: cyprus cypriot;
    albania: albania albanian; china: china chinese prc; japan: japan japanese; korea: korea
    korean south_korea; north_korea: north_korea; india: india indian; pakistan: pakistan
    pakistani; bangladesh: bangladesh bangladeshi; sri_lanka: sri_lanka sri_lankan; nepal:
    nepal nepali; thailand: thailand thai; vietnam: vietnam vietnamese; indonesia: indonesia
    indonesian; malaysia: malaysia malaysian; singapore: singapore singaporean; philippines:
    philippines filipino philippine; taiwan: taiwan taiwanese; hong_kong: hong_kong; israel:
    israel israeli; iran: iran iranian persian; iraq: iraq iraqi; saudi_arabia: saudi_arabia
    saudi; uae: uae united_arab_emirates emirati dubai abu_dhabi; qatar: qatar; egypt: egypt
    egyptian; morocco: morocco moroccan; nigeria: nigeria nigerian; kenya: kenya kenyan;
    south_africa: south_africa; ghana: ghana ghanaian; ethiopia: ethiopia ethiopian; brazil:
    brazil brazilian; argentina: argentina argentinian argentine; chile: chile chilean;
    colombia: colombia colombian; peru: peru peruvian; cuba: cuba cuban; jamaica: jamaica
    jamaican; asia: asia asian; africa: africa african; scandinavia: scandinavia scandinavian;
    london: london; manchester: manchester; birmingham: birmingham; edinburgh: edinburgh;
    glasgow: glasgow; liverpool: liverpool; leeds: leeds; bristol: bristol; cardiff: cardiff;
    belfast: belfast; dublin: dublin; oxford: oxford; cambridge: cambridge; newcastle: newcastle;
    sheffield: sheffield; nottingham: nottingham; brighton: brighton; york: york;
    new_york: new_york nyc; los_angeles: los_angeles la; san_francisco: san_francisco;
    chicago: chicago; boston: boston; washington: washington dc; seattle: seattle; miami: miami;
    toronto: toronto; vancouver: vancouver; montreal: montreal; sydney: sydney; melbourne:
    melbourne; paris: paris; berlin: berlin; munich: munich; madrid: madrid; barcelona:
    barcelona; rome: rome; milan: milan; amsterdam: amsterdam; brussels: brussels; vienna:
    vienna; zurich: zurich; geneva: geneva; stockholm: stockholm; oslo: oslo; copenhagen:
    copenhagen; helsinki: helsinki; lisbon: lisbon; prague: prague; warsaw: warsaw; budapest:
    budapest; athens: athens; istanbul: istanbul; moscow: moscow; tokyo: tokyo; beijing:
    beijing; shanghai: shanghai; seoul: seoul; delhi: delhi new_delhi; mumbai: mumbai;
    bangkok: bangkok; cairo: cairo; lagos: lagos; nairobi: nairobi
    """,
    add_canon=False,
)
# "US" only in capitals (lower-case "us" is a pronoun).
_US_CAPS = re.compile(r"\b(?:US|U\.S\.?|USA)\b")

_LANGUAGES = _table(
    """
    english: english inglés ingles anglais englisch inglese; french: french francais français
    francés frances französisch franzosisch; german: german deutsch alemán aleman allemand;
    spanish: spanish español espanol castilian castellano espagnol spanisch; italian: italian
    italiano; portuguese: portuguese português; dutch: dutch flemish; swedish: swedish;
    norwegian: norwegian; danish: danish;
    finnish: finnish; polish: polish polski; czech: czech; slovak: slovak; hungarian: hungarian;
    romanian: romanian; bulgarian: bulgarian; greek: greek; turkish: turkish; russian: russian;
    ukrainian: ukrainian; croatian: croatian; serbian: serbian; slovenian: slovenian;
    lithuanian: lithuanian; latvian: latvian; estonian: estonian; icelandic: icelandic;
    irish: irish gaelic; welsh: welsh cymraeg; catalan: catalan; basque: basque; albanian:
    albanian; maltese: maltese; arabic: arabic; hebrew: hebrew; persian: persian farsi; hindi:
    hindi; urdu: urdu; bengali: bengali bangla; punjabi: punjabi; tamil: tamil; telugu: telugu;
    marathi: marathi; gujarati: gujarati; nepali: nepali; sinhala: sinhala sinhalese; chinese:
    chinese; mandarin: mandarin; cantonese: cantonese; japanese: japanese; korean: korean;
    vietnamese: vietnamese; thai: thai; indonesian: indonesian; malay: malay; tagalog: tagalog
    filipino; swahili: swahili; amharic: amharic; yoruba: yoruba; hausa: hausa; igbo: igbo;
    zulu: zulu; xhosa: xhosa; afrikaans: afrikaans; somali: somali; latin: latin; esperanto:
    esperanto; sign_language: bsl asl sign_language;
    python: python python3 py; javascript: javascript js ecmascript node nodejs node.js;
    typescript: typescript ts; java: java; kotlin: kotlin; scala: scala; csharp: c# csharp;
    cpp: c++ cpp; c: c; golang: golang go; rust: rust; ruby: ruby; php: php; swift: swift;
    objc: objective-c objc; dart: dart; haskell: haskell; ocaml: ocaml; fsharp: f#; elixir:
    elixir; erlang: erlang; clojure: clojure; lisp: lisp; scheme: scheme; perl: perl; lua: lua;
    r: r; julia: julia; matlab: matlab; sql: sql; plsql: pl/sql; bash: bash sh shell zsh;
    powershell: powershell; vba: vba; fortran: fortran; cobol: cobol; assembly: assembly asm;
    zig: zig; nim: nim; groovy: groovy; solidity: solidity; html: html; css: css
    """
)
# Programming-language names that are also everyday words count only in a language context.
_AMBIGUOUS_LANGS = frozenset(
    {"c", "r", "go", "golang", "rust", "ruby", "swift", "dart", "julia", "scheme", "shell",
     "sh", "node", "assembly", "java", "python", "py", "ts", "js", "nim", "zig", "lua", "groovy",
     "latin", "asm", "scala", "lisp", "elixir", "sql", "html", "css", "bash"}
)  # fmt: skip
_LANG_CONTEXT_BEFORE = re.compile(
    r"(?:\b(?:in|into|to|using|with|from|en|auf|write|translate|translated|learn|learning"
    r"|speak|speaking|code|coding|program|programming|version)|[-(])\s*$"
)
_LANG_CONTEXT_AFTER = re.compile(
    r"^\s*(?:code|program|programs|script|scripts|function|functions|library|libraries|package"
    r"|packages|compiler|interpreter|version|translation|subtitles|speaker|speakers|language"
    r"|lesson|lessons|course|class|classes|module|modules|syntax|developer|developers|app)\b"
)

_PLATFORMS = _table(
    """
    ios: ios iphone iphones; ipad: ipad ipads ipados; android: android; windows: windows win10
    win11; macos: macos mac macs macbook macbooks imac osx os_x; linux: linux; ubuntu: ubuntu;
    debian: debian; fedora: fedora; chromeos: chromeos chromebook chromebooks chrome_os;
    xbox: xbox; playstation: playstation ps4 ps5; nintendo: nintendo; kindle: kindle;
    smarttv: smart_tv firestick fire_stick roku; alexa: alexa echo; chrome: chrome; firefox:
    firefox; safari: safari; edge: microsoft_edge; watch: apple_watch smartwatch wear_os;
    blackberry: blackberry; huawei: huawei harmonyos; samsung: samsung galaxy
    """,
    add_canon=False,
)
_GENERIC_DEVICES = _table(
    """
    desktop: desktop desktops pc pcs laptop laptops computer computers; mobile: mobile
    smartphone smartphones; tablet: tablet tablets
    """
)
# Mutually exclusive options: compared only when both questions name one ("by train" vs "by
# bus"); naming one on one side only is not an objection.
_EXCLUSIVE: dict[str, dict[str, str]] = {
    "colour": _table(
        """
        red: red reds; orange: orange; yellow: yellow; green: green; blue: blue; purple: purple
        violet; pink: pink; brown: brown; black: black; white: white; grey: grey gray; silver:
        silver; gold: gold golden; beige: beige; navy: navy; turquoise: turquoise teal
        """,
        add_canon=False,
    ),
    "size": _table(
        """
        xs: extra_small xs; small: small; medium: medium regular; large: large; xl: extra_large
        xl xxl; king_size: king-size king_size; queen_size: queen-size queen_size
        """,
        add_canon=False,
    ),
    "meal": _table(
        """
        breakfast: breakfast breakfasts; brunch: brunch; lunch: lunch lunches luncheon;
        dinner: dinner dinners supper evening_meal; afternoon_tea: afternoon_tea
        """,
        add_canon=False,
    ),
    "transport": _table(
        """
        car: car cars drive driving; bus: bus buses; coach: coach coaches; train: train trains
        rail railway; plane: plane planes flight flights fly flying air; ferry: ferry ferries
        boat; bike: bike bikes bicycle bicycles cycle cycling; taxi: taxi taxis cab uber;
        tram: tram trams; underground: tube underground metro subway; walk: walk walking foot
        """,
        add_canon=False,
    ),
    "payment": _table(
        """
        cash: cash; cheque: cheque cheques check_payment; card: card_payment card_payments
        by_card with_card with_a_card contactless;
        transfer: bank_transfer wire_transfer; direct_debit: direct_debit; standing_order:
        standing_order; paypal: paypal; apple_pay: apple_pay; google_pay: google_pay;
        klarna: klarna; crypto: crypto cryptocurrency bitcoin
        """,
        add_canon=False,
    ),
    "animal": _table(
        """
        dog: dog dogs; cat: cat cats; rabbit: rabbit rabbits; horse: horse horses; bird: bird
        birds parrot parrots; hamster: hamster hamsters; guinea_pig: guinea_pig guinea_pigs;
        reptile: snake snakes lizard lizards reptile reptiles
        """,
        add_canon=False,
    ),
    "account": _table(
        """
        current: current_account current_accounts checking_account; savings: savings_account
        savings_accounts; isa: isa isas; pension: pension pensions; mortgage: mortgage
        mortgages; loan: personal_loan; credit_card: credit_card credit_cards
        """,
        add_canon=False,
    ),
    "insurance": _table(
        """
        car: car_insurance motor_insurance; home: home_insurance house_insurance; travel:
        travel_insurance; life: life_insurance; health: health_insurance medical_insurance;
        pet: pet_insurance; contents: contents_insurance
        """,
        add_canon=False,
    ),
}
_RELATIVE_TIME = re.compile(
    r"\b(this|next|last|previous|coming|following) (week|weekend|fortnight|month|year|quarter"
    r"|term|semester|season|monday|tuesday|wednesday|thursday|friday|saturday|sunday|morning"
    r"|afternoon|evening|night|spring|summer|autumn|winter)\b"
)
_RELATIVE_CANON = {"previous": "last", "coming": "next", "following": "next"}
_RELATIVE_TRIGGERS = _wordset("this next last previous coming following")
_WINDOWS_CONTEXT = re.compile(
    r"\bwindows (?:\d+|xp|vista|pc|laptop|computer|machine|update|server|store|key|defender)\b"
    r"|\b(?:on|for|using|install|with|run|running|runs) windows\b"
)

# --- Formats ---------------------------------------------------------------------------------
_FORMAT_RE: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(p))
    for name, p in (
        ("json", r"\bjson\b"),
        ("yaml", r"\bya?ml\b"),
        ("csv", r"\bcsv\b|\bcomma[- ]separated\b"),
        ("tsv", r"\btsv\b|\btab[- ]separated\b"),
        ("xml", r"\bxml\b"),
        ("html", r"\bhtml\b"),
        ("markdown", r"\bmarkdown\b|\bmd\b"),
        ("latex", r"\blatex\b"),
        ("toml", r"\btoml\b"),
        ("pdf", r"\bpdf\b"),
        ("spreadsheet", r"\bspreadsheet\b|\bexcel\b|\bxlsx\b"),
        (
            "table",
            r"\b(?:as|in|into|with|using|make|create|give me|show)\b(?: an?| the| a simple)?"
            r"(?: markdown| html| comparison)? table\b|\btabular\b|\btable (?:format|form)\b"
            r"|\ba table (?:of|comparing|showing|listing|with|that)\b",
        ),
        ("bullets", r"\bbullet(?:ed|s)?\b|\bbullet[- ]points?\b|\bdot points\b"),
        ("numbered", r"\bnumbered\b|\bordered list\b"),
        ("list", r"\b(?:as|in|into) an? (?:short |simple |quick )?list\b|\blist form(?:at)?\b"),
        (
            "sentence",
            r"\b(?:in|as|with|using) (?:a |one |a single |\d+ |two |three )?sentences?\b"
            r"|\bone[- ]sentence\b|\bsingle sentence\b|\bone[- ]liner?\b",
        ),
        (
            "paragraph",
            r"\b(?:in|as|with|using) (?:a |one |a single |\d+ |two |three )?"
            r"paragraphs?\b|\bone[- ]paragraph\b",
        ),
        (
            "words",
            r"\b(?:in|under|within|at most|max(?:imum)?|no more than|up to|less than|fewer"
            r" than|around|about) (?:\d+|[a-z]+) words\b|\b\d+[- ]word\b",
        ),
        (
            "code",
            r"\bcode (?:block|snippet|sample|example)s?\b|\bcode only\b|\bjust (?:the )?code"
            r"\b|\bsnippet\b",
        ),
        (
            "brief",
            r"\bbrief(?:ly)?\b|\bconcise(?:ly)?\b|\bsummar(?:y|ies|i[sz]e|i[sz]ed)\b"
            r"|\btl;?dr\b|\bin short\b|\bin a nutshell\b|\bshort answer\b|\bin a few words\b"
            r"|\bquick(?:ly)? (?:answer|overview|summary)\b|\bsuccinct(?:ly)?\b",
        ),
        (
            "detailed",
            r"\bdetailed\b|\bin (?:great |more |full )?(?:detail|depth)\b"
            r"|\bin-depth\b|\bcomprehensive(?:ly)?\b|\bthorough(?:ly)?\b|\bexhaustive\b"
            r"|\blong answer\b|\bfull explanation\b|\belaborate\b",
        ),
        (
            "simple",
            r"\beli5\b|\blike i'?m (?:five|5|a child)\b|\bin (?:simple|plain|layman'?s?)"
            r" (?:terms|english|language|words)\b|\bfor (?:a )?(?:beginners?|dummies)\b",
        ),
        ("technical", r"\bin technical (?:terms|detail)\b|\btechnical(?:ly)? (?:answer|version)"),
        ("diagram", r"\bdiagram\b|\bflow ?chart\b|\bmermaid\b|\b(?:as|in) a (?:chart|graph)\b"),
        ("poem", r"\bpoem\b|\bpoetry\b|\bhaiku\b|\blimerick\b|\bsonnet\b|\brhym(?:e|ing)\b"),
        (
            "genre",
            r"\b(?:as|in the form of|write) an? (?:essay|tweet|story|email|letter|song"
            r"|script|speech|blog post|press release|dialogue|faq)\b",
        ),
        ("emoji", r"\bemojis?\b"),
        ("uppercase", r"\bin (?:all )?(?:caps|capitals|upper ?case)\b"),
        ("formal", r"\bformal(?:ly)? (?:tone|style|language|register)\b|\bin a formal\b"),
        ("casual", r"\b(?:casual|informal|friendly)(?:ly)? (?:tone|style|language|register)\b"),
    )
)

# --- Qualifiers --------------------------------------------------------------------------------
_QUALIFIER_RE: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(p))
    for name, p in (
        (
            "online",
            r"\bonline\b|\bon ?line\b|\bon (?:the|your|our) (?:web ?site|internet)\b"
            r"|\bvia (?:the )?(?:web|internet|website)\b|\be-?commerce\b",
        ),
        (
            "in-person",
            r"\bin[- ](?:store|branch|person|shop)\b|\boffline\b|\bface[- ]to[- ]face\b"
            r"|\bin (?:a|the|your|one of your) (?:shop|store|branch)e?s?\b|\bover the counter\b",
        ),
        ("by-phone", r"\b(?:by|over the|via|on the) (?:tele)?phone\b|\bphone call\b"),
        (
            "by-post",
            r"\bby (?:post|mail)\b|\bin the post\b|\bpostal\b|\bsnail mail\b"
            r"|\bpaper (?:forms?|applications?|returns?|statements?|bills?|copy|copies)\b",
        ),
        (
            "business",
            r"\bbusiness(?:es)?\b|\bcorporate\b|\bcommercial\b|\benterprise\b"
            r"|\bsole traders?\b|\bsmes?\b|\blimited compan|\bfor (?:my|our|a|the) compan",
        ),
        ("personal", r"\bpersonal (?:account|use|customers?|banking|loan)s?\b"),
        # members and non-members share a class: the difference is a negation ("non-").
        (
            "members",
            r"(?<!team )(?<!staff )(?<!family )(?<!crew )(?<!board )(?<!cast )"
            r"\b(?:non-?)?members?\b(?! of (?:staff|the team|my family|the public))"
            r"|\bmembership\b|\bsubscribers?\b",
        ),
        ("new-customer", r"\bnew (?:customers?|users?|clients?)\b"),
        ("existing-customer", r"\bexisting (?:customers?|users?|clients?)\b"),
        (
            "international",
            r"\binternational(?:ly)?\b|\babroad\b|\boverseas\b|\bworldwide\b"
            r"|\bforeign\b",
        ),
        ("domestic", r"\bdomestic(?:ally)?\b|\bnationwide\b|\bin-country\b"),
        ("express", r"\bexpress\b|\bexpedited\b|\bpriority\b"),
        ("next-day", r"\bnext[- ]day\b|\bovernight delivery\b"),
        ("same-day", r"\bsame[- ]day\b"),
        ("part-time", r"\bpart[- ]time(?:rs?)?\b"),
        ("full-time", r"\bfull[- ]time\b"),
        (
            "self-employed",
            r"\bself[- ]employed\b|\bfreelanc(?:e|er|ers|ing)\b|\bcontractors?\b"
            r"|\bsole traders?\b",
        ),
        ("zero-hours", r"\bzero[- ]hours?\b"),
        ("unemployed", r"\bunemployed\b|\bout of work\b|\bjobless\b|\bon benefits\b"),
        ("temporary", r"\btemporary\b|\btemp\b|\bfixed[- ]term\b"),
        ("undergraduate", r"\bundergrad(?:uate)?s?\b|\bbachelor'?s?\b"),
        ("postgraduate", r"\bpostgrad(?:uate)?s?\b|\bmaster'?s?\b|\bmsc\b|\bphd\b|\bdoctoral\b"),
        ("student", r"\bstudents?\b"),
        (
            "kids",
            r"\bkids?\b|\bchild(?:ren)?(?:'s)?\b|\btoddlers?\b|\bbab(?:y|ies)\b|\binfants?\b"
            r"|\bjuniors?\b|\bminors?\b|\bunder[- ]?1[68]s?\b",
        ),
        ("teens", r"\bteen(?:ager)?s?\b|\badolescents?\b|\byoung (?:people|adults)\b"),
        ("adults", r"\badults?\b|\bgrown[- ]ups?\b"),
        (
            "seniors",
            r"\bseniors?\b|\belderly\b|\bpensioners?\b|\bretirees?\b|\bretired\b"
            r"|\bover[- ]?6[05]s?\b"
            r"|\bolder (?:people|adults)\b|\boap\b",
        ),
        ("veterans", r"\bveterans?\b|\bmilitary\b|\barmed forces\b"),
        ("disability", r"\bdisabilit(?:y|ies)\b|\bwheelchairs?\b"),
        ("vegan", r"\bvegan\b"),
        ("vegetarian", r"\bvegetarian\b|\bveggie\b"),
        ("gluten-free", r"\bgluten[- ]free\b|\bcoeliacs?\b|\bceliacs?\b"),
        ("dairy-free", r"\bdairy[- ]free\b|\blactose[- ]free\b|\blactose intolerant\b"),
        ("halal", r"\bhalal\b"),
        ("kosher", r"\bkosher\b"),
        ("electric", r"\belectric (?:car|vehicle|van)s?\b|\bevs?\b"),
        ("petrol", r"\bpetrol\b|\bgasoline\b"),
        ("diesel", r"\bdiesel\b"),
        ("hybrid", r"\bhybrid\b"),
        ("leasehold", r"\bleasehold\b"),
        ("freehold", r"\bfreehold\b"),
        ("wholesale", r"\bwholesale\b|\bin bulk\b|\bbulk\b"),
        (
            "second-hand",
            r"\bsecond[- ]?hand\b|\bused\b(?= (?:car|phone|item|bike|vehicle)s?\b)"
            r"|\brefurbished\b|\bpre[- ]owned\b",
        ),
        ("joint", r"\bjoint\b"),
        ("sole", r"\bsole (?:account|name|owner)\b|\bin my (?:own )?name\b"),
        ("premium", r"\bpremium\b|\bpro (?:plan|tier|version|account|subscription)\b"),
        ("free-tier", r"\bfree (?:plan|tier|version|account|trial)\b"),
    )
)


def _split_top(pattern: str) -> list[str]:
    """Top-level alternatives of a regex source."""
    out, depth, cur, i = [], 0, [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            cur.append(pattern[i : i + 2])
            i += 2
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "|" and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _group_end(pattern: str, i: int) -> int:
    """Index of the parenthesis closing the group opened at `i`."""
    depth = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i = pattern.index("]", i + 1)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return len(pattern) - 1


def _trigger_keys(pattern: str) -> frozenset[str] | None:
    """3-letter word prefixes one of which every match of `pattern` must contain, or None.

    Used to skip regexes cheaply: a pattern is searched only if a word of the text starts
    with one of its keys.  Conservative: None means "always search".
    """
    keys: set[str] = set()
    for branch in _split_top(pattern):
        k = _branch_keys(branch)
        if k is None:
            return None
        keys |= k
    return frozenset(keys)


def _branch_keys(branch: str) -> frozenset[str] | None:
    """Candidate keys of one alternative: a letter trigram from a literal run it must contain,
    or "=w" for a short whole word between \\b anchors; the most selective set wins."""
    candidates: list[frozenset[str]] = []
    run: list[str] = []
    run_bounded = False  # the current run started right after \b

    def flush(ends_at_boundary: bool) -> None:
        text = "".join(run)
        letters = max(re.findall(r"[^\W\d_]+", text), key=len, default="")
        if len(letters) >= 3:
            # The middle trigram is as good as any; prefer the rarest-looking (the longest run).
            candidates.append(frozenset({letters[:3]}))
        elif letters and text == letters and run_bounded and ends_at_boundary:
            candidates.append(frozenset({"=" + letters}))
        run.clear()

    i = 0
    while i < len(branch):
        ch = branch[i]
        nxt = branch[i + 1] if i + 1 < len(branch) else ""
        if ch == "\\":
            flush(nxt == "b")
            run_bounded = nxt == "b"
            i += 2
            continue
        if ch == "(":
            flush(False)
            run_bounded = False
            j = _group_end(branch, i)
            body = branch[i + 1 : j]
            after = branch[j + 1] if j + 1 < len(branch) else ""
            if body.startswith(("?=", "?!", "?<=", "?<!")) or after in ("?", "*", "{"):
                i = j + 1
                continue
            if body.startswith("?:"):
                body = body[2:]
            elif body.startswith("?P<"):
                body = body[body.index(">") + 1 :]
            inner = _trigger_keys(body)
            if inner:
                candidates.append(inner)
            i = j + 1
            continue
        if ch == "[":
            flush(False)
            run_bounded = False
            i = branch.index("]", i + 1) + 1
            continue
        if (ch.isalnum() or ch in "'-;#%") and nxt not in ("?", "*", "{"):
            run.append(ch)
        else:
            flush(False)
            run_bounded = False
        i += 1
    flush(True)
    if not candidates:
        return None
    return min(candidates, key=len)


class _AnyOf:
    """Named patterns, each searched only if a word starts like a literal it requires."""

    __slots__ = ("_always", "_by_key", "_items", "_keys")

    def __init__(self, named: tuple[tuple[str, re.Pattern[str]], ...]) -> None:
        self._items = named
        self._always: list[int] = []
        self._by_key: dict[str, list[int]] = {}
        for idx, (_, rx) in enumerate(named):
            keys = _trigger_keys(rx.pattern)
            if not keys:
                self._always.append(idx)
                continue
            for k in keys:
                self._by_key.setdefault(k, []).append(idx)
        self._keys = frozenset(self._by_key)

    def names(
        self, text: str, grams: frozenset[str], surface: set[tuple[str, str]] | None = None
    ) -> set[str]:
        """Names of the patterns found in `text`; `grams` are the text's `_trigrams`."""
        todo = set(self._always)
        for key in self._keys.intersection(grams):
            todo.update(self._by_key[key])
        out = set()
        for idx in todo:
            name, rx = self._items[idx]
            m = rx.search(text)
            if m:
                out.add(name)
                if surface is not None:
                    found = [_plural_strip(w.removesuffix("'s")) for w in _WORD.findall(m.group(0))]
                    surface.add((name, " ".join(found)))
        return out


def _trigrams(words: Iterable[str]) -> frozenset[str]:
    """Letter trigrams of the words, and "=w" for words shorter than three letters."""
    out: set[str] = set()
    for w in words:
        if len(w) < 3:
            out.add("=" + w)
        else:
            out.update(w[k : k + 3] for k in range(len(w) - 2))
    return frozenset(out)


_FORMAT_ANY = _AnyOf(_FORMAT_RE)
_QUALIFIER_ANY = _AnyOf(_QUALIFIER_RE)

# --- Identifiers ------------------------------------------------------------------------------
# (triggers, pattern): the pattern runs only if one trigger substring occurs (None: always).
# Matches are blanked out before later steps, so a URL is not also read as a dotted path.
_IDENT_STEPS: tuple[tuple[tuple[str, ...] | None, re.Pattern[str]], ...] = (
    (("`",), re.compile(r"`[^`]+`")),
    (("://", "www."), re.compile(r"\bhttps?://[^\s<>\"')]+|\bwww\.[^\s<>\"')]+")),
    (("@",), re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    (("/", "\\"), re.compile(r"(?:~|\.{1,2})?/(?:[\w.-]+/)+[\w.-]*|[A-Za-z]:\\[^\s]+|~/[\w./-]+")),
    (("_",), re.compile(r"\b[A-Za-z_]\w*_\w+\b")),  # snake_case
    (None, re.compile(r"\b[a-z]{2,}[A-Z][A-Za-z0-9]*\b")),  # camelCase
    (("(",), re.compile(r"\b[A-Za-z_][\w.]*\(\)")),  # call()
    ((".",), re.compile(r"\b[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)+\b")),  # dotted.path, file.ext
    ((".",), re.compile(r"(?<![\w.])\.[A-Za-z]\w{0,9}\b")),  # .ext
    (("-",), re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")),  # --flag, -v
    (
        ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
        re.compile(r"\b(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z\d]{2,}\b"),  # a1b2, mp3, x86
    ),
)
_ALNUM_NOT_IDENT = re.compile(
    r"^\d+(?:st|nd|rd|th|s|am|pm|k|m|bn|mn|x|p|yo|h|hr|hrs|min|mins|kg|g|mg|lb|lbs|km|cm|mm|ml|l"
    r"|gb|mb|kb|tb|mph|kph|mbps|gbps|ghz|mhz|w|kw|kwh|v|mah|d|y|yr|yrs|mo|wk|wks)$"
)

# --- Substitution ------------------------------------------------------------------------------
# Two questions identical but for one short span where a noun was swapped ("a pool" / "a gym",
# "for visitors" / "for residents") ask about different things.  Function words, verbs and
# adjectives (paraphrases swap these: "make/submit a claim") and words owned by other guards
# (numbers, dates, places, ...) are not nouns here; synonyms and misspellings are forgiven.
_FUNCTION_WORDS = _wordset(
    """
    a an the my your our their his her its this that these those some any no each every all both
    either neither i me we us you he him she it they them myself yourself ourselves themselves
    there here is are was were be been being am do does did done have has had having can could
    will would shall should may might must how what when where why which who whom whose whether
    if so to of in on at by for with from into onto about as than then and or but nor not just
    also still please only even ever again already yet very too much many more most less least
    out up down off over under after before during until since while via per ok okay hi hello
    thanks thank something anything everything nothing someone anyone everyone somebody anybody
    one ones thing things stuff way ways kind sort type bit lot lots else instead really actually
    possible able allowed sure going currently usually normally generally exactly
    """
)
_VERB_WORDS = _wordset(
    """
    get make do have take give go come see look find use need want know think say tell ask help
    try keep let put set pay buy sell send receive order book reserve cancel change update edit
    delete remove add create open close start stop end finish begin apply submit request obtain
    claim return refund exchange replace repair fix reset restore recover register sign log join
    leave move switch transfer withdraw deposit save spend check verify confirm contact call email
    phone text message write read speak talk reach visit arrive travel fly drive ride walk park
    rent hire lease borrow lend own live work study learn teach eat drink cook clean wash print
    scan upload download install uninstall upgrade downgrade activate deactivate enable disable
    lock unlock block unblock freeze unfreeze report complain appeal challenge dispute renew
    extend increase decrease reduce raise lower improve prevent avoid allow accept reject decline
    approve pass fail win lose earn owe charge bill cost collect deliver ship post track trace
    locate search show display share link connect disconnect sync manage run choose pick select
    compare recommend suggest offer provide include cover protect insure qualify count mean
    happen bring carry wear fit suit stay sleep wake feel hurt treat test prescribe schedule
    arrange organise organize plan prepare pack unpack load watch listen play stream subscribe
    unsubscribe follow unfollow like comment invite attend miss catch board generate access enter
    exit drop cash top fill sort deal handle process cause seem become remain belong depend
    expect wait hold turn build break cut draw fall fight forget forgive grow hang hear hide hit
    lay lead lie meet quit ride ring rise seek shake shine shoot shut sing sink sit stand steal
    stick strike swim swing tear throw understand file lodge undo redo rebook reissue resend
    reschedule postpone delay shorten sort settle clear lodge top-up set-up log-in sign-in
    arrange notify inform advise assist support answer explain describe define calculate work
    estimate convert translate reverse sort merge split rename move copy paste restart reboot
    refresh reinstall redeem retrieve recover report replace reapply rejoin reopen resubmit
    reserve secure guarantee permit release store earn invest fund finance afford waive
    """
)
_ADJ_WORDS = _wordset(
    """
    new old big small large little good bad best better worse worst cheap expensive free paid
    easy hard quick fast slow early late long short high low full empty open closed available
    local nearest near next last first other same different main own current previous latest
    recent young senior junior public private personal online extra additional standard basic
    premium express urgent important simple safe secure legal official single double whole entire
    daily weekly monthly annual yearly normal regular usual special specific general total minimum
    maximum average exact right wrong correct proper quickest cheapest easiest closest quiet busy
    due ready happy sorry nice great fine smart digital physical electronic automatic manual
    affordable reasonable lowest highest top bottom major minor half real actual original final
    initial temporary permanent fixed flexible valid invalid active inactive missing lost stolen
    damaged broken faulty wrong late overdue outstanding pending successful unsuccessful
    """
)
_NOUN_SYNONYMS = tuple(
    frozenset(line.split())
    for line in """
    parcel package order delivery shipment item items goods purchase
    shop store outlet
    price cost fee charge rate amount
    flat apartment
    car vehicle motor
    phone mobile cellphone smartphone handset
    holiday vacation trip break getaway
    bill invoice
    account profile
    password passcode passphrase
    refund reimbursement
    doctor gp physician
    medicine medication drug tablets pills prescription
    vaccine vaccination injection
    lift elevator
    toilet bathroom restroom loo
    film movie
    tv television telly
    rubbish trash garbage waste litter
    pavement sidewalk
    motorway highway freeway
    petrol gas fuel
    postcode zipcode zip
    surname lastname
    job role position post
    salary pay wages wage earnings income
    company business firm organisation organization
    customer client
    child kid
    mum mother mom
    dad father
    ticket pass
    fine penalty
    luggage baggage bags bag suitcase case
    house home property
    email mail
    internet broadband wifi connection
    appointment booking reservation slot
    problem issue fault error
    question query enquiry inquiry
    address location
    number no
    staff employees team workers
    photo picture image
    app application
    website site webpage page
    assistance help support
    guide instructions steps process procedure
    contract agreement plan deal
    meal food dish
    room bedroom
    trainers sneakers
    autumn fall
    queue line
    tap faucet
    parking car-park
    cinema theatre theater
    clinic surgery practice
    """.strip().splitlines()
)
_SYNONYM_OF: dict[str, frozenset[int]] = {}
for _gi, _grp in enumerate(_NOUN_SYNONYMS):
    for _w in _grp:
        _SYNONYM_OF[_w] = _SYNONYM_OF.get(_w, frozenset()) | {_gi}

# --- Entities ---------------------------------------------------------------------------------
_CAPS_COMMON = _wordset(
    """
    i i'm i'd i've i'll ok okay id pin faq faqs asap fyi tv pc atm am pm vat etc eg ie ps
    """
)
_AMBIG_ACRONYMS = _wordset(
    """
    US IT AM PM OR IN ON NO ME HI SO TO AT BE DO GO IF IS MY OF UP WE AN AS BY HE OK A I
    """
)


# --------------------------------------------------------------------------------------------
# Antonym tables (built once at import)
# --------------------------------------------------------------------------------------------

_IRREGULAR = {
    "bought": "buy", "sold": "sell", "won": "win", "lost": "lose", "gave": "give",
    "given": "give", "took": "take", "taken": "take", "sent": "send", "lent": "lend",
    "spent": "spend", "began": "begin", "begun": "begin", "came": "come", "went": "go",
    "gone": "go", "brought": "bring", "found": "find", "forgot": "forget",
    "forgotten": "forget", "hid": "hide", "hidden": "hide", "shown": "show", "taught": "teach",
    "learnt": "learn", "froze": "freeze", "frozen": "freeze", "woke": "wake", "slept": "sleep",
    "sank": "sink", "sunk": "sink", "rose": "rise", "risen": "rise", "fell": "fall",
    "fallen": "fall", "grew": "grow", "grown": "grow", "shrank": "shrink", "shrunk": "shrink",
    "broke": "break", "broken": "break", "kept": "keep", "paid": "pay", "held": "hold",
    "children": "child", "men": "man", "women": "woman", "wives": "wife", "died": "die",
    "dying": "die", "lying": "lie", "better": "better", "left": "leave",
}  # fmt: skip


def _inflections(w: str) -> set[str]:
    """Regular inflections of a base form (over-generation is harmless for lookup)."""
    out = {w}
    if " " in w or "-" in w or len(w) < 3:
        return out
    out.add(w + "s")
    if w.endswith(("s", "x", "z", "ch", "sh")):
        out.add(w + "es")
    if w.endswith("y") and w[-2] not in "aeiou":
        out.update({w[:-1] + "ies", w[:-1] + "ied"})
    if w.endswith("e"):
        out.update({w + "d", w[:-1] + "ing", w + "r", w + "st"})
    elif w.endswith("y") and w[-2] not in "aeiou":
        out.update({w + "ed", w + "ing", w[:-1] + "ier", w[:-1] + "iest"})
    else:
        out.update({w + "ed", w + "ing", w + "er", w + "est"})
        if len(w) <= 5 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
            dbl = w + w[-1]
            out.update({dbl + "ed", dbl + "ing", dbl + "er", dbl + "est"})
    return out


def _build_antonyms() -> dict[str, frozenset[tuple[int, int]]]:
    forms: dict[str, set[tuple[int, int]]] = {}
    for gi, group in enumerate(_ANTONYM_SPEC.split(";")):
        group = " ".join(group.split())
        if "|" not in group:
            continue
        left, right = group.split("|", 1)
        for side, words in enumerate((left.split(), right.split())):
            for w in words:
                for f in _inflections(w):
                    forms.setdefault(f, set()).add((gi, side))
    for irr, base in _IRREGULAR.items():
        if base in forms:
            forms.setdefault(irr, set()).update(forms[base])
    return {k: frozenset(v) for k, v in forms.items()}


_ANTONYMS = _build_antonyms()
_ON_OFF = ((-1, 0), (-1, 1))  # pseudo antonym group for the particles on / off
# "off" that is not the opposite of "on": discounts, time off, off-peak, pay off.
_OFF_NEUTRAL = re.compile(
    r"(?:\d|%|\bper ?cent|\bpercent) off\b|\b(?:days?|time|weeks?|nights?|afternoons?|pay|paid"
    r"|paying|pays|better|well|drop|dropped|write|written|kick|show|set) off\b|\boff[- ]peak\b"
    r"|\boff (?:sick|work|duty|topic)\b"
)
_PARTICLES = {"in": "out", "out": "in", "on": "off", "off": "on", "up": "down", "down": "up"}
_PHRASAL_EXCEPT = frozenset({"fill", "filled", "filling", "fills", "find", "finding", "found"})
_PHRASAL_PSEUDO = {
    ("turn", "on"): "enable", ("switch", "on"): "enable", ("power", "on"): "enable",
    ("turn", "off"): "disable", ("switch", "off"): "disable", ("power", "off"): "disable",
    ("log", "in"): "login", ("sign", "in"): "login", ("log", "out"): "logout",
    ("sign", "out"): "logout", ("opt", "in"): "optin", ("opt", "out"): "optout",
    ("check", "in"): "checkin", ("check", "out"): "checkout",
}  # fmt: skip


def _verb_base(w: str) -> str:
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    for suf in ("ing", "ed", "s"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            stem = w[: -len(suf)]
            if len(stem) > 3 and stem[-1] == stem[-2]:
                stem = stem[:-1]
            return stem
    return w


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Features:
    numbers: tuple[_Num, ...]  # numeric items (unit, canonical value, value as written)
    soft_numbers: tuple[_Num, ...]  # ambiguous number words ("one", "first", "second")
    dates: frozenset[str]
    soft_dates: frozenset[str]  # frequencies and deictic days, compared only if both have one
    negations: int  # grammatical negators (not, n't, never, no, ...)
    neg_lex: int  # lexical negation (without, avoid, stop doing, fail to, non-, ...)
    words: frozenset[str]  # case-folded word tokens (hyphen-split)
    tokens: tuple[str, ...]  # the same, in order, possessive 's removed
    lemmas: frozenset[str]  # words plus crude singular forms
    compounds: frozenset[str]  # hyphenated compounds, case-folded
    joined: frozenset[str]  # compounds without hyphens and adjacent word pairs run together
    antonym_words: tuple[tuple[str, frozenset[tuple[int, int]]], ...]  # word -> lexicon keys
    antonym_keys: frozenset[tuple[int, int]]
    phrasal: frozenset[tuple[str, str]]
    morph: tuple[tuple[str, tuple[str, ...]], ...]  # (word, forms that would oppose it)
    persons: frozenset[str]
    entities: frozenset[str]  # case-folded proper nouns / acronyms not covered by a class
    places: frozenset[str]
    currencies: frozenset[str]
    platforms: frozenset[str]
    devices: frozenset[str]
    identifiers: frozenset[str]
    formats: frozenset[str]
    languages: frozenset[str]
    qualifiers: frozenset[str]
    exclusive: frozenset[str]  # "kind:option" of mutually exclusive option classes
    surface: frozenset[tuple[str, str]]  # (canonical, word as written) for typo tolerance
    swaps: frozenset[tuple[str, str]]  # (directional marker, following content word)


_TIME_AMPM = re.compile(r"\b(\d{1,2})(?:[:.](\d{2}))?\s?(am|pm)\b")
_TIME_24 = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_DATE_NUM = re.compile(
    r"\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b|\b\d{1,2}\.\d{1,2}\.\d{2,4}\b"
)
_VERSION = re.compile(r"\bv\d+(?:\.\d+)*\b|\b\d+(?:\.\d+){2,}\b")
_NUMBER = re.compile(
    r"(?P<cur>[£$€¥₹])?\s?"
    r"(?P<n>\d+(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)"
    r"(?P<ord>st|nd|rd|th)?"
    r"(?:\s?(?P<mult>k|m|mn|bn|million|billion|thousand)\b)?"
    r"(?:\s?(?P<pct>%|percent\b|per ?cent\b))?"
    r"(?:[ -]?(?P<unit>[a-z°/]+(?:-old)?))?"
)
_STOP = _wordset(
    """
    a an the my your our their his her its this that these those some any of me us you it
    i we they he she one new old own current existing other
    """
)


def _canon_decimal(raw: str, mult: str | None) -> str:
    raw = raw.replace(",", "")
    if mult:
        try:
            d = Decimal(raw) * _MULTIPLIERS[mult]
        except (InvalidOperation, KeyError):
            return raw
        d = d.normalize()
        return format(d.quantize(Decimal(1)) if d == d.to_integral_value() else d, "f")
    if "." in raw:
        whole, frac = raw.split(".", 1)
        if frac.strip("0") == "":
            raw = whole
    return raw.lstrip("0") or "0"


_HAS_DIGIT = re.compile(r"\d")


def _numeric(low: str) -> list[_Num]:
    """Numbers, money, percentages, times, dates and versions as (kind/unit, value) items."""
    items: list[_Num] = []
    s = low
    for m in _TIME_AMPM.finditer(s):
        h, mi = int(m.group(1)), int(m.group(2) or 0)
        if m.group(3) == "pm" and h < 12:
            h += 12
        elif m.group(3) == "am" and h == 12:
            h = 0
        items.append(_canon_item("time", f"{h:02d}:{mi:02d}"))
    s = _TIME_AMPM.sub(" ", s)
    for m in _TIME_24.finditer(s):
        items.append(_canon_item("time", f"{int(m.group(1)):02d}:{m.group(2)}"))
    s = _TIME_24.sub(" ", s)
    for m in _DATE_NUM.finditer(s):
        parts = re.split(r"[-/.]", m.group(0))
        items.append(_canon_item("date", "/".join(str(int(p)) for p in parts)))
    s = _DATE_NUM.sub(" ", s)
    for m in _VERSION.finditer(s):
        items.append(_canon_item("version", m.group(0).lstrip("v")))
    s = _VERSION.sub(" ", s)
    for m in _NUMBER.finditer(s):
        cur, mult, unit_raw = m.group("cur"), m.group("mult"), m.group("unit")
        if mult == "m" and not cur:  # 5m = five metres unless it is money
            mult, unit_raw = None, "m"
        value = _canon_decimal(m.group("n"), mult)
        unit = _CURRENCY_SYMBOLS[cur] if cur else None
        if m.group("pct"):
            unit = "pct"
        elif unit is None and unit_raw:
            unit = _UNITS.get(unit_raw) or _UNITS.get(_plural_strip(unit_raw))
            if unit_raw.startswith(("year", "yr")) or unit_raw.endswith("-old"):
                unit = "year"
        elif unit_raw in ("pounds", "p"):  # "£5 pounds" style redundancy
            pass
        items.append(_canon_item(unit or "num", value))
    return items


def _number_words(tokens: list[str]) -> tuple[list[_Num], list[_Num]]:
    """Spelled-out cardinals/ordinals -> (unit, value); ambiguous words are returned as soft."""
    hard: list[_Num] = []
    soft: list[_Num] = []
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        nxt = tokens[i + 1] if i + 1 < n else ""
        if t in _ORDINAL_WORDS:
            (soft if t in _SOFT_WORDS else hard).append(_canon_item("num", str(_ORDINAL_WORDS[t])))
            i += 1
            continue
        if t in _MULTIPLICATIVES:
            (soft if t in _SOFT_WORDS else hard).append(_canon_item("x", str(_MULTIPLICATIVES[t])))
            i += 1
            continue
        starts = t in _SMALL_NUMBERS or t in _TENS or (t in ("a", "an") and nxt in _SCALES)
        if not starts:
            i += 1
            continue
        total, cur, j, words = 0, 0, i, []
        while j < n:
            w = tokens[j]
            if w in _SMALL_NUMBERS:
                cur += _SMALL_NUMBERS[w]
            elif w in _TENS:
                cur += _TENS[w]
            elif w == "hundred":
                cur = max(cur, 1) * 100
            elif w in ("thousand", "million", "billion"):
                total += max(cur, 1) * _SCALES[w]
                cur = 0
            elif w in ("a", "an") and j == i:
                cur = 0
            elif w == "and" and j > i and j + 1 < n and tokens[j + 1] in _SMALL_NUMBERS:
                pass
            else:
                break
            words.append(w)
            j += 1
        value = total + cur
        unit_tok = tokens[j] if j < n else ""
        unit = _UNITS.get(unit_tok) or _UNITS.get(_plural_strip(unit_tok)) or "num"
        if unit in ("m", "g", "l", "in", "st", "c", "h", "s", "x", "p", "v", "w"):
            unit = "num"  # single-letter unit symbols do not follow spelled-out numbers
        item = _canon_item(unit, str(value))
        (soft if words == ["one"] else hard).append(item)
        i = max(j, i + 1)
    return hard, soft


def _is_sentence_start(text: str, start: int) -> bool:
    return start == 0 or bool(_SENT_BREAK.search(text[max(0, start - 4) : start]))


_TOKEN_STRIP = "\"'()[]{}<>,;:!?"


def _identifiers(text: str) -> set[str]:
    """Code identifiers, URLs, e-mails, paths, file names, flags, letter-digit codes."""
    out: set[str] = set()
    if "`" in text:
        for m in _IDENT_STEPS[0][1].finditer(text):
            out.add(m.group(0).strip("`").casefold())
        text = _IDENT_STEPS[0][1].sub(" ", text)
    for raw in text.split():
        tok = raw.strip(_TOKEN_STRIP).rstrip(".")
        plain = tok.replace("'", "")
        if not tok or plain.isdigit():
            continue
        if plain.isalpha() and (plain.islower() or plain.isupper() or plain.istitle()):
            continue
        for triggers, rx in _IDENT_STEPS[1:]:
            if triggers is not None and not any(t in tok for t in triggers):
                continue
            found = rx.search(tok)
            if found:
                ident = found.group(0).rstrip(".,;:!?)").casefold()
                if ident and not _ALNUM_NOT_IDENT.match(ident) and ident not in _PLATFORMS:
                    out.add(ident)
                    break
    return out


def _entities(text: str, tokens: list[tuple[str, int]], excluded: frozenset[str]) -> set[str]:
    """Proper nouns, brands, acronyms, CamelCase words (case-folded)."""
    if text.islower() or not any(not t.islower() for t, _ in tokens):
        return set()
    alpha = [t for t, _ in tokens if len(t) > 1]
    capitalised = sum(1 for t in alpha if t[0].isupper())
    title_case = len(alpha) >= 4 and capitalised / len(alpha) > 0.7
    if alpha and sum(1 for t in alpha if t.isupper()) >= 0.8 * len(alpha):
        return set()  # shouting: capitals carry no information
    spans = (
        [(m.start(), m.end(), m.group(0)) for m in _COMPOUND.finditer(text)] if "-" in text else []
    )
    out: set[str] = set()
    for tok, start in tokens:
        if tok.islower():
            continue
        base = tok[:-2] if tok.endswith("'s") else tok
        low = base.casefold()
        if low in _CAPS_COMMON or low in excluded or len(base) < 2:
            continue
        is_caps = base.isupper() and len(base) >= 2
        is_camel = any(c.isupper() for c in base[1:]) and any(c.islower() for c in base)
        if is_caps and base in _AMBIG_ACRONYMS:
            continue
        proper = base[0].isupper() and not title_case and not _is_sentence_start(text, start)
        if is_caps or is_camel or proper:
            # A part of a hyphenated name stands for the whole name: "Wi-Fi" -> "wifi".
            for s0, s1, comp in spans:
                if s0 <= start < s1:
                    low = comp.replace("-", "").casefold()
                    break
            out.add(low)
    return out


_LANG_TOKEN = re.compile(r"(?:[^\W\d_]|[#+])(?:[^\W\d_]|[#+]|[./-](?=[^\W\d_]))*")
_AMBIG_LANG_BEFORE = re.compile(
    r"\b(?:in|into|using|with|write|written in|code in|learn|learning|program in)\s*$"
)


def _languages(norm: str) -> set[str]:
    """Requested natural or programming languages ("in French", "using Rust", "en español").

    Nationality words count only in a language context (else they are places); programming
    languages that are everyday words (go, rust, swift, c) need a capital and a context.
    """
    out: set[str] = set()
    for m in _LANG_TOKEN.finditer(norm):
        tok = m.group(0)
        w = tok.casefold()
        canon = _LANGUAGES.get(w)
        if canon is None:
            continue
        before = norm[max(0, m.start() - 30) : m.start()].casefold()
        after = norm[m.end() : m.end() + 30].casefold()
        if w in _AMBIGUOUS_LANGS:
            named = tok[0].isupper() or tok.isupper()
            if not (
                _LANG_CONTEXT_AFTER.search(after)
                or (named and _AMBIG_LANG_BEFORE.search(before))
                or (
                    w not in _VERY_AMBIGUOUS_LANGS
                    and (named or _LANG_CONTEXT_BEFORE.search(before))
                )
            ):
                continue
        elif canon in _LANG_NATIONALITIES and not (
            _LANG_CONTEXT_BEFORE.search(before) or _LANG_CONTEXT_AFTER.search(after)
        ):
            continue  # "French bank holidays" is a place, handled by the entities guard
        out.add(canon)
    return out


_LANGUAGE_WORDS = frozenset(w for f in _LANGUAGES for w in re.findall(r"[^\W\d_]+", f))
_LANGUAGE_VOCAB = frozenset(_LANGUAGES)
_VERY_AMBIGUOUS_LANGS = _wordset("c r go rust swift dart julia scheme shell sh node assembly")
_LANG_NATIONALITIES = frozenset(v for k, v in _LANGUAGES.items() if k in _PLACES)


_BENEFICIARY_RE = re.compile(
    r"\b(?:for|on behalf of|of) (?:my|our|a|an|the|his|her|their|your) (?:own )?([a-z]+)"
    r"|\bas (?:a|an|the|my|your) ([a-z]+)"
)


def _persons(low: str, words: list[str]) -> set[str]:
    """Whose thing it is: "p:" pronoun/other-person marks, "o:" owner roles, "r:" any role.

    An owner role is a relative/role word used as a possessor ("my colleague's password") or
    beneficiary ("for my son"); a plain mention ("ask my employer") is only a role.
    """
    out: set[str] = set()
    if _THIRD_PERSON.intersection(words):
        out.add("p:third-person")
    if not _OTHER_PERSON_TRIGGERS.isdisjoint(words) and _OTHER_PERSON_RE.search(low):
        out.add("p:someone-else")
    for w in words:
        possessive = w.endswith(("'s", "s'"))
        base = w[:-2] if w.endswith("'s") else w.rstrip("'")
        role = _ROLES.get(base) or _ROLES.get(_plural_strip(base))
        if role and role != "other":
            out.add("r:" + role)
            if possessive:
                out.add("o:" + role)
    if not any(x.startswith("r:") for x in out):
        return out
    for m in _BENEFICIARY_RE.finditer(low):
        w = m.group(1) or m.group(2)
        role = _ROLES.get(w) or _ROLES.get(_plural_strip(w))
        if role and role != "other":
            out.add("o:" + role)
    return out


_SWAP_TARGET = frozenset({"to", "into", "onto", "towards", "toward"})
_SWAP_SOURCE = frozenset({"from"})


def _next_content(words: list[str], i: int, step: int) -> str | None:
    j = i + step
    for _ in range(3):
        if not 0 <= j < len(words):
            return None
        w = words[j]
        if w in _SWAP_TARGET or w in _SWAP_SOURCE or w == "than":
            return None
        if w not in _STOP:
            return _plural_strip(w)
        j += step
    return None


def _swaps(words: list[str], salient: frozenset[str]) -> set[tuple[str, str]]:
    """Direction roles: ("src", X) / ("tgt", Y) for "from X to Y", "X to Y"; ("than", Y).

    Without an explicit "from", the salient word (name, acronym, class term) before "to" is
    taken as the source: "convert Word to PDF".
    """
    out: set[tuple[str, str]] = set()
    has_from = "from" in words
    for i, w in enumerate(words):
        if w in _SWAP_TARGET:
            nxt = _next_content(words, i, 1)
            if nxt:
                out.add(("tgt", nxt))
            if not has_from:
                prev = _next_content(words, i, -1)
                if prev and prev in salient:
                    out.add(("src", prev))
        elif w in _SWAP_SOURCE:
            nxt = _next_content(words, i, 1)
            if nxt:
                out.add(("src", nxt))
        elif w == "than":
            nxt = _next_content(words, i, 1)
            if nxt:
                out.add(("than", nxt))
    return out


_SOFT_DATES = frozenset(
    {"hourly", "daily", "weekly", "fortnightly", "monthly", "quarterly", "annual", "today",
     "tonight", "this-week", "this-weekend", "this-month", "this-year", "this-morning",
     "this-afternoon", "this-evening"}
)  # fmt: skip
_SMALL_NUM_RE = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve"
_HOUR_WORDS = {w: i + 1 for i, w in enumerate(_SMALL_NUM_RE.split("|"))}
_SPOKEN_TIME = re.compile(
    rf"\b(\d{{1,2}}|{_SMALL_NUM_RE})(?:[:.](\d\d))?(?: o'?clock)?"
    r" (?:(?:this|in the|tomorrow|today|on \w+) )?(morning|afternoon|evening|night|tonight)\b"
)


def _spoken_time(m: re.Match[str]) -> str:
    h = m.group(1)
    hour = int(h) if h.isdigit() else _HOUR_WORDS[h]
    if hour > 12:
        return m.group(0)
    suffix = "am" if m.group(3) == "morning" else "pm"
    mins = f":{m.group(2)}" if m.group(2) else ""
    return f"{hour}{mins}{suffix}"


_CURRENCIES = _table(
    """
    gbp: gbp pound pounds sterling quid pence; usd: usd dollar dollars bucks cents; eur: eur
    euro euros; jpy: jpy yen; cny: cny yuan rmb renminbi; inr: inr rupee rupees; chf: chf franc
    francs; btc: btc bitcoin bitcoins; eth: ethereum
    """
)


def _build_class_index() -> tuple[dict[str, tuple[tuple[str, str], ...]], frozenset[str]]:
    """One lookup for all closed word classes: form -> ((class, canonical), ...)."""
    index: dict[str, list[tuple[str, str]]] = {}
    for kind, table in (
        ("date", _DATE_WORDS),
        ("place", _PLACES),
        ("currency", _CURRENCIES),
        ("platform", _PLATFORMS),
        ("device", _GENERIC_DEVICES),
    ):
        for form, canon in table.items():
            index.setdefault(form, []).append((kind, canon))
    for xkind, table in _EXCLUSIVE.items():
        for form, canon in table.items():
            index.setdefault(form, []).append(("x", f"{xkind}:{canon}"))
    heads = frozenset(f.split()[0] for f in index if " " in f)
    return {k: tuple(v) for k, v in index.items()}, heads


_CLASS_INDEX, _MULTIWORD_HEADS = _build_class_index()
_DATE_PHRASE_TRIGGERS = _wordset(
    "hour day week fortnight month quarter year holiday holidays leave"
)
_SPOKEN_TIME_TRIGGERS = ("morning", "afternoon", "evening", "night")
_OTHER_PERSON_TRIGGERS = _wordset("someone somebody anyone anybody other another")


def _classes(words: list[str], surface: set[tuple[str, str]]) -> dict[str, set[str]]:
    """Members of the closed classes (dates, places, ...); records (canonical, word) pairs."""
    out: dict[str, set[str]] = {
        "date": set(), "place": set(), "currency": set(), "platform": set(), "device": set(),
        "x": set(),
    }  # fmt: skip
    n = len(words)
    for i, w in enumerate(words):
        hit = _CLASS_INDEX.get(w)
        if hit:
            for kind, canon in hit:
                out[kind].add(canon)
                surface.add((canon, w))
        if w in _MULTIWORD_HEADS and i + 1 < n:
            bi = w + " " + words[i + 1]
            for kind, canon in _CLASS_INDEX.get(bi, ()):
                out[kind].add(canon)
                surface.add((canon, bi))
            if i + 2 < n:
                for kind, canon in _CLASS_INDEX.get(bi + " " + words[i + 2], ()):
                    out[kind].add(canon)
                    surface.add((canon, bi + " " + words[i + 2]))
    return out


@lru_cache(maxsize=65536)
def _morph_candidates(x: str) -> tuple[str, ...]:
    """Forms whose presence on the other side would make `x` their negation or opposite.

    lock -> unlock, members -> non-members, careless -> careful, upload -> download.
    """
    if x.startswith(("un-", "anti-", "counter-")):
        x = x.replace("-", "")
    if x in _FALSE_PREFIXED or len(x) < 5:
        return ()
    out: list[str] = []
    for p in _NEG_PREFIX_BY_HEAD.get(x[:2], ()):
        if not x.startswith(p):
            continue
        stem = x[len(p) :]
        if len(stem) < (5 if p == "de" else 3):
            continue
        if (p == "im" and stem[0] not in "bmp") or (p in ("il", "ir") and stem[0] != p[1]):
            continue
        out.append(stem)
        out.append(_plural_strip(stem))
    if x.endswith("less") and len(x) > 7:
        stem = x[:-4]
        out.extend((stem + "ful", stem, stem + "s"))
    for pa, pb in _PREFIX_PAIR_BY_HEAD.get(x[:2], ()):
        if x.startswith(pa) and len(x) - len(pa) >= 3:
            out.append(pb + x[len(pa) :])
    return tuple(out)


_NEG_PREFIX_BY_HEAD: dict[str, list[str]] = {}
for _p in _NEG_PREFIXES:
    _NEG_PREFIX_BY_HEAD.setdefault(_p[:2], []).append(_p)
_PREFIX_PAIR_BY_HEAD: dict[str, list[tuple[str, str]]] = {}
for _p1, _p2 in _PREFIX_PAIRS:
    _PREFIX_PAIR_BY_HEAD.setdefault(_p1[:2], []).append((_p1, _p2))
    _PREFIX_PAIR_BY_HEAD.setdefault(_p2[:2], []).append((_p2, _p1))


@lru_cache(maxsize=1024)  # stored questions recur across lookups; about 9 KB an entry
def _features(text: str) -> _Features:
    """Everything the guards compare, extracted once per text."""
    norm = normalize(text)
    if not norm.isascii():
        norm = norm.translate(_TYPO)
    if "." in norm:
        norm = _DOTTED_ABBR.sub(lambda m: m.group(0).replace(".", ""), norm)
    cased = [(m.group(0), m.start()) for m in _WORD.finditer(norm)]
    low = norm.casefold()
    if any(t in low for t in _SPOKEN_TIME_TRIGGERS):
        low = _SPOKEN_TIME.sub(_spoken_time, low)
        words = [m.group(0) for m in _WORD.finditer(low)]
    else:
        words = [t.casefold() for t, _ in cased]
    words_nopos = [w[:-2] if w.endswith("'s") else w for w in words]
    wordset = frozenset(words_nopos)
    lemmas = frozenset(wordset | {_plural_strip(w) for w in wordset})
    compounds = (
        frozenset(m.group(0) for m in _COMPOUND.finditer(low)) if "-" in low else frozenset()
    )
    surface: set[tuple[str, str]] = set()
    cls = _classes(words_nopos, surface)

    # numbers, dates
    hard = _numeric(low) if _HAS_DIGIT.search(low) else []
    w_hard, w_soft = _number_words(words_nopos)
    hard.extend(w_hard)
    dates = cls["date"]
    if "may" in wordset or "march" in wordset:
        for tok, start in cased:
            if tok in ("May", "March") and not _is_sentence_start(norm, start):
                dates.add(tok.casefold())
        for month in _AMBIGUOUS_MONTHS:
            if re.search(rf"\b\d+(?:st|nd|rd|th)? (?:of )?{month}\b|\b{month} \d", low):
                dates.add(month)
    if not _DATE_PHRASE_TRIGGERS.isdisjoint(wordset):
        for m in _DATE_PHRASES.finditer(low):
            if m.group("freq"):
                dates.add(_FREQ[m.group("unit")])
            elif m.group("ny"):
                dates.add("new-year")
            elif m.group("bh"):
                dates.add("bank-holiday")
                surface.add(("bank-holiday", "bank holiday"))
            elif m.group("bd"):
                dates.add("boxing-day")
            elif m.group("al"):
                dates.discard("annual")
    if not _RELATIVE_TRIGGERS.isdisjoint(wordset):
        for m in _RELATIVE_TIME.finditer(low):
            if low[max(0, m.start() - 5) : m.start()] == "than ":
                continue  # a comparison baseline: "more than last month"
            rel = _RELATIVE_CANON.get(m.group(1), m.group(1))
            dates.add(f"{rel}-{_DATE_WORDS.get(m.group(2), m.group(2))}")
    soft_dates = dates & _SOFT_DATES
    dates -= soft_dates

    # negation
    negations = neg_lex = 0
    if "'t" in low or not _NEG_TRIGGERS.isdisjoint(wordset):
        negations = len(_NEG_RE.findall(low))
        if negations:
            negations = max(0, negations - len(_NEG_NEUTRAL.findall(low)))
        neg_lex = len(_NEG_LEX_RE.findall(low))

    # antonyms
    ant: dict[str, frozenset[tuple[int, int]]] = {}
    for w in wordset | compounds:
        k = _ANTONYMS.get(w)
        if k:
            ant[w] = k
    if "off" in wordset and _OFF_NEUTRAL.sub(" ", low).find(" off") >= 0:
        ant["off"] = frozenset({_ON_OFF[1]})
    if "on" in wordset:
        ant["on"] = frozenset({_ON_OFF[0]})
    if "without" in wordset and _FREE_RE.search(low):
        ant["free"] = _ANTONYMS["free"]
    if "less" in wordset or "least" in wordset:
        # "less expensive" = "cheaper", "least busy" = "quietest": flip the adjective.
        for i, w in enumerate(words_nopos[:-1]):
            x = words_nopos[i + 1]
            if w in ("less", "least") and x in ant:
                ant[f"{w} {x}"] = frozenset((g, 1 - side) for g, side in ant.pop(x))
                ant.pop(w, None)
    phrasal: set[tuple[str, str]] = set()
    for i in range(len(words_nopos) - 1):
        p = words_nopos[i + 1]
        if p in _PARTICLES:
            v = words_nopos[i]
            if v in _PHRASAL_EXCEPT or v in _STOP or v in _PARTICLES:
                continue
            vb = _verb_base(v)
            phrasal.add((vb, p))
            pseudo = _PHRASAL_PSEUDO.get((vb, p))
            if pseudo and pseudo in _ANTONYMS:
                ant[pseudo] = _ANTONYMS[pseudo]
    morph = tuple((w, cands) for w in wordset | compounds if (cands := _morph_candidates(w)))

    # classes
    places = cls["place"]
    if "U" in norm and _US_CAPS.search(norm):
        places.add("us")
    currencies = cls["currency"]
    currencies.update(_CURRENCY_SYMBOLS[ch] for ch in norm if ch in _CURRENCY_SYMBOLS)
    platforms = cls["platform"]
    if "windows" in platforms and not ("Windows" in norm or _WINDOWS_CONTEXT.search(low)):
        platforms.discard("windows")
    languages = _languages(norm) if not _LANGUAGE_WORDS.isdisjoint(wordset) else set()
    grams = _trigrams(wordset)
    formats = _FORMAT_ANY.names(low, grams, surface)
    qualifiers = _QUALIFIER_ANY.names(low, grams, surface)
    identifiers = _identifiers(norm)
    entities = _entities(norm, cased, _ENTITY_EXCLUDED) - identifiers
    salient = frozenset(
        entities | {w for w in wordset if w in _ENTITY_EXCLUDED and w not in _DATE_WORDS}
    )
    persons = _persons(low, words) if not _PERSON_TRIGGERS.isdisjoint(lemmas) else set()

    return _Features(
        numbers=tuple(sorted(hard)),
        soft_numbers=tuple(sorted(w_soft)),
        dates=frozenset(dates),
        soft_dates=frozenset(soft_dates),
        negations=negations,
        neg_lex=neg_lex,
        words=wordset,
        tokens=tuple(words_nopos),
        lemmas=lemmas,
        compounds=compounds,
        joined=frozenset(
            {c.replace("-", "") for c in compounds}
            | {words_nopos[i] + words_nopos[i + 1] for i in range(len(words_nopos) - 1)}
        ),
        antonym_words=tuple(ant.items()),
        antonym_keys=frozenset(k for ks in ant.values() for k in ks),
        phrasal=frozenset(phrasal),
        morph=morph,
        persons=frozenset(persons),
        entities=frozenset(entities),
        places=frozenset(places),
        currencies=frozenset(currencies),
        platforms=frozenset(platforms),
        devices=frozenset(cls["device"]),
        identifiers=frozenset(identifiers),
        formats=frozenset(formats),
        languages=frozenset(languages),
        qualifiers=frozenset(qualifiers),
        exclusive=frozenset(cls["x"]),
        surface=frozenset(surface),
        swaps=frozenset(_swaps(words_nopos, salient)),
    )


_FORMAT_WORDS = _wordset(
    "json yaml yml csv tsv xml html markdown latex toml pdf excel xlsx eli5 tldr"
)
_ENTITY_EXCLUDED = (
    frozenset(
        set(_DATE_WORDS) | set(_PLACES) | set(_LANGUAGES) | set(_PLATFORMS) | set(_CURRENCIES)
    )
    | _FORMAT_WORDS
    | frozenset(_AMBIGUOUS_MONTHS)
)


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def _set_mismatch(
    a: frozenset[str], b: frozenset[str], fa: _Features, fb: _Features, vocab: frozenset[str]
) -> int:
    """Items of a or b missing from the other side, forgiving plausible misspellings."""
    missing = 0
    for x, f1, f2 in [(x, fa, fb) for x in a - b] + [(x, fb, fa) for x in b - a]:
        forms = [w for c, w in f1.surface if c == x] or [x]
        if not any(_misspelt_in(form, f2, vocab) for form in forms):
            missing += 1
    return missing


def _misspelt_in(form: str, other: _Features, vocab: frozenset[str]) -> bool:
    """Every word of `form` occurs in `other`, at least one of them only as a misspelling."""
    typo = False
    for w in form.split():
        if w in other.lemmas:
            continue
        if len(w) < 3 or not _typo_of(w, other.lemmas, vocab):
            return False
        typo = True
    return typo


def _match_numbers(a: tuple[_Num, ...], b: tuple[_Num, ...]) -> tuple[list[_Num], list[_Num]]:
    """Pair up numeric items; return the leftovers of each side.

    Exact (unit, canonical value) matches first; then a unit-less number may match an item with
    a unit on the other side when the written or canonical values agree ("18" / "18-year-old").
    """
    left_a, left_b = list(a), list(b)
    for item in a:
        for j, other in enumerate(left_b):
            if other[:2] == item[:2]:
                left_a.remove(item)
                del left_b[j]
                break
    for xs, ys in ((left_a, left_b), (left_b, left_a)):
        for item in list(xs):
            if item[0] != "num":
                continue
            for j, other in enumerate(ys):
                if item[1] in (other[1], other[2]):
                    xs.remove(item)
                    del ys[j]
                    break
    return left_a, left_b


def _guard_numbers(fa: _Features, fb: _Features) -> str | None:
    """Numbers, money, percentages, times, numeric dates, versions, date words must match.

    Ambiguous number words ("one", "first", "second") may be left over on one side only.
    Frequencies (monthly, annual) and deictic days (today, tonight) are compared only when both
    sides mention one.
    """
    ra, rb = _match_numbers(fa.numbers, fb.numbers)
    # Soft number words may absorb leftovers of the same value on the other side.
    sa, sb = list(fa.soft_numbers), list(fb.soft_numbers)
    for left, soft in ((ra, sb), (rb, sa)):
        for item in list(left):
            for j, other in enumerate(soft):
                if item[1] in (other[1], other[2]):
                    left.remove(item)
                    del soft[j]
                    break
    if ra or rb:
        return f"numbers differ ({len(ra)}/{len(rb)} unmatched)"
    sa2, sb2 = _match_numbers(tuple(sa), tuple(sb))
    if sa2 and sb2:
        return "ordinals differ"
    if fa.dates != fb.dates and _set_mismatch(fa.dates, fb.dates, fa, fb, _DATE_VOCAB):
        return "dates/times differ"
    if fa.soft_dates and fb.soft_dates and fa.soft_dates != fb.soft_dates:
        return "frequency/relative day differs"
    return None


_DATE_VOCAB = frozenset(_DATE_WORDS)


def _oppositions(fa: _Features, fb: _Features) -> set[frozenset[str]]:
    """Opposed word pairs between the two sides (collection stops after two).

    A word present only on one side whose opposite (lexicon group, same verb with the opposite
    particle, or negated/opposite derivation) is present only on the other side.  Pairs found
    by several mechanisms (impossible/possible) count once.
    """
    pairs: set[frozenset[str]] = set()
    if fa.antonym_keys and fb.antonym_keys:
        names_a = {w for w, _ in fa.antonym_words}
        names_b = {w for w, _ in fb.antonym_words}
        only_a = [(w, k) for w, k in fa.antonym_words if w not in names_b]
        only_b = [(w, k) for w, k in fb.antonym_words if w not in names_a]
        for wa, ka in only_a:
            for wb, kb in only_b:
                for g, side in ka:
                    opp = (g, 1 - side)
                    if (
                        opp in kb
                        and opp not in fa.antonym_keys
                        and (g, side) not in fb.antonym_keys
                    ):
                        pairs.add(frozenset((wa, wb)))
                        break
    pa, pb = fa.phrasal - fb.phrasal, fb.phrasal - fa.phrasal
    for v, p in pa:
        if (v, _PARTICLES[p]) in pb:
            pairs.add(frozenset((f"{v} {p}", f"{v} {_PARTICLES[p]}")))
    if len(pairs) < 2:
        for f1, f2 in ((fa, fb), (fb, fa)):
            for w, cands in f1.morph:
                if w in f2.words or w in f2.compounds:
                    continue
                for c in cands:
                    if (c in f2.lemmas or c in f2.compounds) and c not in f1.lemmas:
                        pairs.add(frozenset((w, c)))
                        break
    return pairs


def _cancelled(fa: _Features, fb: _Features, oppositions: set[frozenset[str]]) -> bool:
    """A grammatical negation offset by exactly one opposite word: "can't remember" ~ "forgot",
    "not allowed" ~ "banned", "not possible" ~ "impossible"."""
    return (
        len(oppositions) == 1
        and fa.negations % 2 != fb.negations % 2
        and fa.neg_lex % 2 == fb.neg_lex % 2
    )


def _guard_negation(fa: _Features, fb: _Features) -> str | None:
    """Parity of negation cues (not, n't, never, no, without, stop doing, avoid, non-, ...).

    A differing grammatical negation is forgiven when exactly one lexical opposition between
    the sides compensates for it (double negation).
    """
    total_a, total_b = fa.negations + fa.neg_lex, fb.negations + fb.neg_lex
    if total_a % 2 != total_b % 2:
        if _cancelled(fa, fb, _oppositions(fa, fb)):
            return None
        return f"negation parity differs ({total_a} vs {total_b})"
    return None


def _guard_antonyms(fa: _Features, fb: _Features) -> str | None:
    """A word on one side only whose opposite is on the other side only; swapped directions.

    Uses a lexicon of opposite word groups, same-verb opposite particles (turn on / turn off),
    morphology (lock/unlock, careful/careless, upload/download) and direction roles ("from A
    to B" vs "from B to A", "A better than B" vs "B better than A").
    """
    opp = _oppositions(fa, fb)
    if opp and not _cancelled(fa, fb, opp):
        return f"opposite words ({len(opp)} pair{'s' if len(opp) > 1 else ''})"
    # Role swap around a direction marker: "from A to B" vs "from B to A", "A than B".
    sa, sb = fa.swaps - fb.swaps, fb.swaps - fa.swaps
    if sa and sb:
        for m1, w1 in sa:
            for m2, w2 in sb:
                if m1 == "than" and m2 == "than":
                    if w1 != w2 and w1 in fb.lemmas and w2 in fa.lemmas:
                        return "comparison swapped"
                elif w1 == w2 and {m1, m2} == {"src", "tgt"}:
                    return "direction swapped"
    return None


def _guard_persons(fa: _Features, fb: _Features) -> str | None:
    """Whose thing it is must agree ("my password" / "my colleague's password" / "his").

    Third-person pronouns and "someone else" must agree; roles used as possessor or
    beneficiary must agree; if both sides mention roles at all, the roles must agree.
    """
    pa = {x for x in fa.persons if not x.startswith("r:")}
    pb = {x for x in fb.persons if not x.startswith("r:")}
    if pa != pb and _set_mismatch(
        frozenset(x[2:] for x in pa), frozenset(x[2:] for x in pb), fa, fb, _PERSON_VOCAB
    ):
        return "possessor differs"
    ra = frozenset(x[2:] for x in fa.persons if x.startswith("r:"))
    rb = frozenset(x[2:] for x in fb.persons if x.startswith("r:"))
    if ra and rb and ra != rb and _set_mismatch(ra, rb, fa, fb, _PERSON_VOCAB):
        return "person roles differ"
    return None


_PERSON_VOCAB = frozenset(_ROLES)


def _guard_entities(fa: _Features, fb: _Features) -> str | None:
    """Proper nouns, acronyms, places (gazetteer, case-insensitive) must agree."""
    if fa.places != fb.places and _set_mismatch(fa.places, fb.places, fa, fb, _PLACE_VOCAB):
        return "places differ"
    if fa.currencies != fb.currencies and _set_mismatch(
        fa.currencies, fb.currencies, fa, fb, _CURRENCY_VOCAB
    ):
        return "currencies differ"
    missing = 0
    for ents, other in ((fa.entities, fb), (fb.entities, fa)):
        for e in ents:
            if e in other.words or e in other.entities or e in other.joined:
                continue
            if _typo_of(e, other.words, frozenset()):
                continue
            missing += 1
    if missing:
        return f"named entities differ ({missing})"
    return None


_PLACE_VOCAB = frozenset(_PLACES)
_CURRENCY_VOCAB = frozenset(_CURRENCIES)


def _guard_platforms(fa: _Features, fb: _Features) -> str | None:
    """Operating systems, devices and browsers must agree."""
    if fa.platforms != fb.platforms and _set_mismatch(
        fa.platforms, fb.platforms, fa, fb, frozenset(_PLATFORMS)
    ):
        return "platforms differ"
    if fa.devices and fb.devices and fa.devices != fb.devices:
        return "device classes differ"
    return None


def _guard_identifiers(fa: _Features, fb: _Features) -> str | None:
    """Code identifiers, file names, URLs, e-mails, paths, flags must be identical."""
    if fa.identifiers != fb.identifiers:
        return f"identifiers differ ({len(fa.identifiers ^ fb.identifiers)})"
    return None


def _guard_format(fa: _Features, fb: _Features) -> str | None:
    """Requested output format (JSON, table, bullets, one sentence, brief/detailed, ...)."""
    if fa.formats != fb.formats and _set_mismatch(fa.formats, fb.formats, fa, fb, frozenset()):
        return f"output format differs ({len(fa.formats ^ fb.formats)} instructions)"
    return None


def _guard_language(fa: _Features, fb: _Features) -> str | None:
    """Requested natural or programming language must agree."""
    if fa.languages != fb.languages and _set_mismatch(
        fa.languages, fb.languages, fa, fb, _LANGUAGE_VOCAB
    ):
        return f"requested language differs ({len(fa.languages ^ fb.languages)})"
    return None


def _guard_qualifiers(fa: _Features, fb: _Features) -> str | None:
    """Restrictive modifiers (online/in-store, members, for business, for kids, vegan, ...)
    must agree; mutually exclusive options (colour, size, meal, transport, payment method,
    animal, account or insurance type) must agree when both sides name one."""
    qa, qb = fa.qualifiers, fb.qualifiers
    if not (qa & _CHANNELS and qb & _CHANNELS):
        qa, qb = qa - _CHANNELS, qb - _CHANNELS  # a channel named on one side only is no scope
    if qa != qb and _set_mismatch(qa, qb, fa, fb, frozenset()):
        return f"restrictive qualifier differs ({len(qa ^ qb)})"
    if fa.exclusive != fb.exclusive and fa.exclusive and fb.exclusive:
        kinds_a = {x.split(":", 1)[0] for x in fa.exclusive}
        kinds_b = {x.split(":", 1)[0] for x in fb.exclusive}
        for kind in kinds_a & kinds_b:
            xa = frozenset(x for x in fa.exclusive if x.startswith(kind + ":"))
            xb = frozenset(x for x in fb.exclusive if x.startswith(kind + ":"))
            if xa != xb:
                return f"exclusive option differs ({kind})"
    return None


_NOT_NOUNS = (
    _FUNCTION_WORDS
    | _ENTITY_EXCLUDED
    | frozenset(_UNITS)
    | frozenset(_SMALL_NUMBERS)
    | frozenset(_TENS)
    | frozenset(_SCALES)
    | frozenset(_ORDINAL_WORDS)
    | frozenset(_MULTIPLICATIVES)
)


def _noun_like(w: str) -> bool:
    """Not a function word, verb, adjective or a word another guard owns (crude, by lists)."""
    if w in _NOT_NOUNS or w in _VERB_WORDS or w in _ADJ_WORDS or w.endswith("ly"):
        return False
    base = _verb_base(w)
    if base in _VERB_WORDS or base + "e" in _VERB_WORDS:
        return False
    for suf in ("er", "est", "ier", "iest"):
        stem = w[: -len(suf)]
        if w.endswith(suf) and (stem in _ADJ_WORDS or stem + "y" in _ADJ_WORDS):
            return False
    return True


def _same_noun(a: str, b: str) -> bool:
    """Equal up to number, a synonym group or a misspelling."""
    if a == b:
        return True
    sa, sb = _plural_strip(a), _plural_strip(b)
    if sa == sb:
        return True
    ga = _SYNONYM_OF.get(a, frozenset()) | _SYNONYM_OF.get(sa, frozenset())
    gb = _SYNONYM_OF.get(b, frozenset()) | _SYNONYM_OF.get(sb, frozenset())
    if ga & gb:
        return True
    # Near repeats misspell short nouns too ("card" / "crad" / "cad"): here any single edit
    # counts as a misspelling (two from seven letters), as true swaps are rarely that close.
    limit = 2 if min(len(a), len(b)) >= 7 else 1
    return min(len(a), len(b)) >= 2 and _osa(a, b, limit) <= limit


def _guard_substitution(fa: _Features, fb: _Features) -> str | None:
    """Otherwise identical questions in which one noun (or a short noun phrase) was swapped.

    The token lists must share a prefix and suffix of at least two tokens between them and
    differ in one span of at most three tokens on each side; after dropping words common to
    both spans, what is left on each side must be nouns (by elimination) that are neither
    synonyms nor misspellings of each other.
    """
    ta, tb = fa.tokens, fb.tokens
    n = min(len(ta), len(tb))
    i = 0
    while i < n and ta[i] == tb[i]:
        i += 1
    j = 0
    while j < n - i and ta[-1 - j] == tb[-1 - j]:
        j += 1
    mid_a, mid_b = ta[i : len(ta) - j], tb[i : len(tb) - j]
    if not mid_a or not mid_b or len(mid_a) > 3 or len(mid_b) > 3 or i + j < 2:
        return None
    ca = [w for w in mid_a if w not in _FUNCTION_WORDS]
    cb = [w for w in mid_b if w not in _FUNCTION_WORDS]
    common = set(ca) & set(cb)
    ca = [w for w in ca if w not in common]
    cb = [w for w in cb if w not in common]
    if not ca or not cb:
        return None  # an insertion, deletion or reordering: not judged here
    if not all(_noun_like(w) for w in ca) or not all(_noun_like(w) for w in cb):
        return None
    if any(_same_noun(x, y) for x in ca for y in cb):
        return None
    return f"noun replaced ({len(ca)}/{len(cb)} words)"


_CHANNELS = frozenset({"online", "in-person", "by-phone", "by-post"})


_GUARD_FUNCS: tuple[tuple[str, Callable[[_Features, _Features], str | None]], ...] = (
    ("numbers", _guard_numbers),
    ("negation", _guard_negation),
    ("antonyms", _guard_antonyms),
    ("identifiers", _guard_identifiers),
    ("persons", _guard_persons),
    ("language", _guard_language),
    ("format", _guard_format),
    ("platforms", _guard_platforms),
    ("entities", _guard_entities),
    ("qualifiers", _guard_qualifiers),
    ("substitution", _guard_substitution),
)

GUARDS: tuple[str, ...] = tuple(name for name, _ in _GUARD_FUNCS)


def check(new: str, stored: str) -> Rejection | None:
    """None if the answer stored for `stored` may be served for `new`, else the first objection."""
    fa, fb = _features(new), _features(stored)
    for name, guard in _GUARD_FUNCS:
        detail = guard(fa, fb)
        if detail is not None:
            return Rejection(name, detail)
    return None
