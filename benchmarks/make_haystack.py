"""Write the default haystack of `lcrun niah`: essay-like English prose, generated here, so that it carries no one
else's copyright and no fact a model could already know.

    .venv/bin/python benchmarks/make_haystack.py            # rewrites models/haystack/essays.txt
    .venv/bin/python benchmarks/make_haystack.py --check    # exit 1 if the shipped file differs from a fresh run

The text is a seeded random walk through topics, sentence shapes and connectives: varied enough that no short
passage repeats (a model should not find the needle because everything around it is a loop), plain ASCII, no digits
(the needle is a number; the haystack must not offer others), paragraphs separated by blank lines. `random.Random`
with a fixed seed gives the same text on every Python 3 version, so the file can always be regenerated and checked.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

TARGET_CHARS = 800_000
SEED = "lcrun-haystack-1"
OUT = Path(__file__).resolve().parent.parent / "models" / "haystack" / "essays.txt"

# topic: (nouns, people (singular, plural), places, adjectives particular to it)
TOPICS: dict[str, tuple[list[str], tuple[str, str], list[str], list[str]]] = {
    "gardening": (["soil", "compost", "the seedlings", "the hedge", "the orchard", "mulch", "the trellis",
                   "the vegetable bed", "rainwater", "the pruning"], ("gardener", "gardeners"),
                  ["an allotment", "a walled garden", "a greenhouse"], ["overgrown", "fertile", "sheltered"]),
    "cartography": (["the map", "the coastline", "a survey", "the legend", "the projection", "the compass rose",
                     "contour lines", "the border", "a field notebook", "the scale bar"], ("surveyor", "surveyors"),
                    ["a drafting room", "a windy headland", "an archive"], ["accurate", "distorted", "faded"]),
    "baking": (["the dough", "the starter", "the crust", "the oven", "flour", "the proving basket", "the crumb",
                "salt", "the recipe", "a cooling rack"], ("baker", "bakers"),
               ["a village bakery", "a cramped kitchen", "a market stall"], ["golden", "dense", "airy"]),
    "shipbuilding": (["the hull", "the keel", "oak planks", "the rigging", "the slipway", "caulking", "the mast",
                      "the launch", "a set of plans", "the rudder"], ("shipwright", "shipwrights"),
                     ["a river yard", "a harbour town", "a covered dock"], ["seaworthy", "tarred", "unfinished"]),
    "astronomy": (["the telescope", "the night sky", "a comet", "the eclipse", "star charts", "the observatory dome",
                   "faint nebulae", "the horizon", "a logbook", "the lens"], ("astronomer", "astronomers"),
                  ["a mountain observatory", "a dark field", "a rooftop"], ["distant", "cloudless", "patient"]),
    "beekeeping": (["the hive", "the queen", "honeycomb", "the smoker", "wax", "the swarm", "pollen", "the colony",
                    "the frames", "nectar"], ("beekeeper", "beekeepers"),
                   ["a meadow", "an orchard edge", "a rooftop apiary"], ["busy", "gentle", "restless"]),
    "weaving": (["the loom", "the warp", "the weft", "wool", "the shuttle", "dyed yarn", "the pattern", "linen",
                 "the selvedge", "a tapestry"], ("weaver", "weavers"),
                ["a workshop", "a mill", "a cottage"], ["tight", "intricate", "coarse"]),
    "mountaineering": (["the ridge", "the summit", "the rope", "the glacier", "the descent", "crampons",
                        "the weather", "the base camp", "a narrow ledge", "the route"], ("climber", "climbers"),
                       ["a high col", "a mountain hut", "a valley village"], ["exposed", "icy", "steep"]),
    "bookbinding": (["the spine", "the stitching", "paper", "the cover boards", "glue", "the signatures",
                     "the endpapers", "leather", "the press", "a worn volume"], ("binder", "binders"),
                    ["a bindery", "a library basement", "a quiet studio"], ["sturdy", "brittle", "handsome"]),
    "river ecology": (["the current", "the riverbank", "sediment", "the reeds", "migrating fish", "the floodplain",
                       "dragonflies", "the estuary", "a beaver dam", "the shallows"], ("ecologist", "ecologists"),
                      ["a marsh", "a wooded bend", "a gravel bar"], ["murky", "teeming", "seasonal"]),
    "clockmaking": (["the escapement", "the pendulum", "gear trains", "the mainspring", "the dial", "brass",
                     "the balance wheel", "the case", "a loupe", "the hands"], ("clockmaker", "clockmakers"),
                    ["a narrow shop", "a guild hall", "a workbench by the window"], ["precise", "delicate", "ornate"]),
    "architecture": (["the facade", "the foundation", "load-bearing walls", "the courtyard", "daylight",
                      "the staircase", "timber beams", "the roofline", "a model in card", "the site plan"],
                     ("architect", "architects"), ["a town square", "a hillside", "an old quarter"],
                     ["spacious", "austere", "graceful"]),
    "cheesemaking": (["the curds", "the whey", "the cellar", "rennet", "the rind", "the wheel", "milk",
                      "the moulds", "a cheese iron", "the brine"], ("cheesemaker", "cheesemakers"),
                     ["a farm dairy", "a cool cave", "an alpine pasture"], ["pungent", "creamy", "aged"]),
    "sailing": (["the sail", "the tiller", "the wind", "the tide", "the mooring", "a chart", "the jib", "the swell",
                 "the anchor", "the crossing"], ("sailor", "sailors"),
                ["a sheltered bay", "the open sea", "a crowded marina"], ["gusty", "calm", "salt-stained"]),
    "pottery": (["the wheel", "the kiln", "clay", "glaze", "the firing", "a bowl", "slip", "the trimming tools",
                 "the studio shelves", "ash"], ("potter", "potters"),
                ["a converted barn", "a shared studio", "a riverside kiln"], ["glazed", "rough", "symmetrical"]),
    "orchestras": (["the score", "the rehearsal", "the strings", "the conductor's baton", "the tempo",
                    "the brass section", "a pause", "the tuning", "the concert hall", "the encore"],
                   ("musician", "musicians"), ["a concert hall", "a rehearsal room", "a summer festival"],
                   ["resonant", "hushed", "brisk"]),
    "forestry": (["the canopy", "seedling pines", "the undergrowth", "a felled trunk", "the firebreak", "moss",
                  "the tree rings", "the logging road", "deadwood", "the clearing"], ("forester", "foresters"),
                 ["an upland plantation", "an ancient wood", "a ranger station"], ["dense", "damp", "shaded"]),
    "lighthouses": (["the lamp", "the lens", "the keeper's log", "the foghorn", "the gallery", "the rocks",
                     "the beam", "the stairwell", "oil", "the storm"], ("keeper", "keepers"),
                    ["a rocky island", "a lonely cape", "a harbour wall"], ["solitary", "whitewashed", "steadfast"]),
    "letter writing": (["the envelope", "ink", "the postmark", "a reply", "the salutation", "the margin",
                        "a draft", "the writing desk", "sealing wax", "the postscript"], ("correspondent",
                        "correspondents"), ["a post office", "a study", "a railway carriage"],
                       ["heartfelt", "formal", "hurried"]),
    "railways": (["the timetable", "the signal box", "the platform", "the junction", "steam", "the sleepers",
                  "the gradient", "the goods yard", "a branch line", "the viaduct"], ("signalman", "signalmen"),
                 ["a country station", "a busy terminus", "a cutting"], ["punctual", "rusting", "crowded"]),
    "glassblowing": (["the furnace", "molten glass", "the blowpipe", "the gather", "the annealing oven",
                      "colour rods", "the punty", "a vase", "the bench", "sand"], ("glassblower", "glassblowers"),
                     ["a hot shop", "an island workshop", "a museum studio"], ["translucent", "fragile", "luminous"]),
    "museums": (["the collection", "the catalogue", "a display case", "the label", "the storeroom", "the visitors",
                 "a loan", "the lighting", "conservation", "the gallery plan"], ("curator", "curators"),
                ["a provincial museum", "a national gallery", "a small archive"], ["dusty", "curated", "fragile"]),
    "cooking": (["the stock", "the knife", "the pan", "spices", "the sauce", "a slow braise", "the seasoning",
                 "the pantry", "a family recipe", "the garnish"], ("cook", "cooks"),
                ["a busy restaurant", "a farmhouse kitchen", "a street stall"], ["fragrant", "simmering", "simple"]),
    "meteorology": (["the barometer", "the forecast", "cold fronts", "the cloud base", "humidity", "a weather balloon",
                     "the isobars", "the wind vane", "a squall", "the records"], ("forecaster", "forecasters"),
                    ["a coastal station", "a research ship", "a hilltop mast"], ["overcast", "unstable", "mild"]),
    "translation": (["the original", "the idiom", "a footnote", "the dictionary", "the rhythm of the sentence",
                     "a second draft", "the tone", "the reader", "a loanword", "the glossary"],
                    ("translator", "translators"), ["a border town", "a publishing house", "a quiet library"],
                    ["faithful", "awkward", "elegant"]),
    "fishing": (["the nets", "the catch", "the harbour", "the bait", "the trawler", "the shoals", "the quay",
                 "the lines", "a tide table", "the gulls"], ("fisher", "fishers"),
                ["a northern port", "a shingle beach", "a lake shore"], ["briny", "plentiful", "weathered"]),
    "mapping caves": (["the passage", "the chamber", "a headlamp", "the survey line", "stalactites", "the sump",
                       "the entrance", "mud", "the echo", "a rope ladder"], ("caver", "cavers"),
                      ["a limestone plateau", "a flooded gorge", "a hidden valley"], ["narrow", "silent", "damp"]),
    "typography": (["the typeface", "the kerning", "the serif", "the page grid", "a proof", "the leading",
                    "the ligature", "the press", "lead type", "the margin"], ("typesetter", "typesetters"),
                   ["a print shop", "a design studio", "a type foundry"], ["legible", "crisp", "condensed"]),
    "carpentry": (["the joint", "the plane", "the grain", "a chisel", "the workbench", "sawdust", "the dovetail",
                   "a mallet", "the finish", "seasoned timber"], ("carpenter", "carpenters"),
                  ["a timber yard", "a workshop", "a building site"], ["square", "smooth", "seasoned"]),
    "archaeology": (["the trench", "potsherds", "the site", "a trowel", "the strata", "the finds tray", "a hearth",
                     "the spoil heap", "the excavation", "a buried wall"], ("archaeologist", "archaeologists"),
                    ["a windswept hill", "a river terrace", "a city cellar"], ["buried", "layered", "fragmentary"]),
}

ADJECTIVES = ["careful", "quiet", "stubborn", "ordinary", "surprising", "modest", "uneven", "familiar", "subtle",
              "durable", "hidden", "generous", "fragile", "patient", "practical", "overlooked", "honest", "slow",
              "steady", "curious", "remarkable", "awkward", "elegant", "neglected", "reliable", "humble"]
ABSTRACTS = ["patience", "habit", "attention", "judgement", "memory", "craft", "routine", "doubt", "trust",
             "curiosity", "experience", "tradition", "practice", "intuition", "care", "restraint", "ambition",
             "skill", "discipline", "chance", "failure", "apprenticeship", "imitation", "boredom"]
VERBS = [("shape", "shapes", "shaped"), ("reveal", "reveals", "revealed"), ("hide", "hides", "hid"),
         ("change", "changes", "changed"), ("test", "tests", "tested"), ("reward", "rewards", "rewarded"),
         ("outlast", "outlasts", "outlasted"), ("complicate", "complicates", "complicated"),
         ("explain", "explains", "explained"), ("teach", "teaches", "taught"), ("spoil", "spoils", "spoiled"),
         ("steady", "steadies", "steadied"), ("govern", "governs", "governed"), ("protect", "protects", "protected"),
         ("mislead", "misleads", "misled"), ("sustain", "sustains", "sustained"), ("follow", "follows", "followed"),
         ("weaken", "weakens", "weakened"), ("clarify", "clarifies", "clarified"), ("resist", "resists", "resisted")]
ADVERBS = ["slowly", "quietly", "rarely", "often", "gradually", "suddenly", "almost always", "seldom",
           "reliably", "unexpectedly", "eventually", "usually", "occasionally", "steadily"]
TIMES = ["in the early morning", "after a long winter", "by the end of the season", "over many years",
         "during the first week", "late in the evening", "in a wet spring", "on a bright afternoon",
         "when the light fails", "before the first frost", "in the middle of summer", "on the last day of autumn"]
OPENERS = ["However,", "Still,", "In practice,", "Of course,", "At first,", "For that reason,", "Even so,",
           "In the end,", "More often than not,", "Seen this way,", "Curiously,", "Just as often,", "Meanwhile,",
           "Put simply,", "Perhaps surprisingly,", "Over time,"]
NAMES = ["Ada", "Bram", "Celia", "Dorian", "Edith", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Leopold",
         "Mara", "Nils", "Odile", "Pavel", "Rosa", "Silas", "Tamsin", "Ulric", "Vera", "Wendell", "Yara", "Zeno"]

SENTENCES = [
    "{Ps} who work with {n1} {adv} say that {n2} matters more than {n3}.",
    "It is tempting to think that {n1} is {a1}, but the {ps} who know it best describe it as {a2}.",
    "{Opener} the trouble with {n1} is rarely {n1b} itself and more often the {abs} of the people around it.",
    "{Name}, {a_p} for most of a lifetime, once said that {n1} {v1s} everything that comes after it.",
    "Nobody sets out to study {n1}; they arrive at it {time}, by way of {n2}.",
    "{A_a1} {p} can spend a whole season on {n1} and still learn something new about {n2}.",
    "{Opener} {abs} is what separates {a_a1} result from a merely {a2} one.",
    "The first lesson of {topic} is that {n1} cannot be hurried.",
    "In {place}, {n1} and {n2} share the same {a1} light, and the {ps} there {adv} notice the difference.",
    "What {n1} {v1s} is not always what {n2} {v1s}, and the gap between them is where the work lies.",
    "{Name} kept a notebook about {n1} and wrote in it {time}, a habit that {v1d} the whole practice.",
    "There is an old saying among {ps} that {n1} forgives everything except {abs2}.",
    "{Opener} the {a1} details of {n1} tell you more than any manual about {topic} could.",
    "If {n1} is {a1}, the rest of the work {adv} follows; if it is {a2}, nothing else will save it.",
    "The {ps} of {place} learned to read {n1} the way others read the weather.",
    "Most accounts of {topic} begin with {n1}, yet the interesting part is {n2}.",
    "{Name} and {Name2} argued for years about {n1}, and neither of them ever changed the other's mind.",
    "A visitor to {place} might notice {n1} first, but {a_p} will look at {n2}.",
    "{Opener} {abs} and {abs2} pull in different directions whenever {n1} is involved.",
    "Nothing about {n1} is {a1} once you have spent a winter with it.",
    "The books say one thing about {n1}; the {ps} in {place} say another, and they are usually right.",
    "{Name} liked to point out that {n1} is older than any theory of {topic}.",
    "Beginners worry about {n1}, while experienced {ps} worry about {n2}.",
    "To understand {n1}, it helps to forget for a moment what you know about {n2}.",
    "{Opener} {a_a1} mistake with {n1} can take a month to notice and a year to undo.",
    "Every {p} has a story about {n1}, and most of those stories end with {abs}.",
    "The history of {topic} is, in large part, a history of {abs} applied to {n1}.",
    "{Time_cap}, {n1} looks {a1}, and the {ps} {adv} leave it alone.",
    "Some {ps} treat {n1} as a puzzle, others as a conversation, and a few as an old friend.",
    "It would be easy to write a whole book on {n1} and never mention {n2}, but it would be a poorer book.",
    "{Name} noticed that {n1} {v1d} {n2} {time}, and nobody had written it down before.",
    "The question is not whether {n1} {v1s} {n2}, but how {adv} it does so.",
    "{Opener} the {ps} who last longest are the ones who enjoy {n1} for its own sake.",
    "A good {p} keeps {n1} {a1} and {n2} within reach.",
    "There are two schools of thought about {n1}, and both of them are partly right.",
    "{Name} once spent an entire afternoon in {place} watching {n1}, and called it the best lesson of the year.",
    "Whatever else changes in {topic}, {n1} remains {a1}.",
    "One could argue that {abs} is simply {abs2} that has been practised for long enough.",
    "{Opener} people outside {topic} rarely see {n1} at all.",
    "When {n1} goes wrong, the {ps} {adv} blame {n2}, though the cause is usually {abs}.",
]
TITLES = ["On {Topic}", "Notes on {N1}", "A Short Essay on {Topic} and {Abs}", "What {N1} Teaches",
          "{Abs} and the Craft of {Topic}", "Letters About {Topic}", "The Quiet Work of {Topic}",
          "Against Hurry: {Topic}", "An Apprentice's View of {Topic}", "Seasons of {Topic}"]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _title(text: str) -> str:
    small = {"of", "and", "the", "a", "on", "an"}
    words = text.split()
    return " ".join(w if (i and w in small) else _cap(w) for i, w in enumerate(words))


def sentence(rng: random.Random, topic: str) -> str:
    nouns, (person, people), places, local_adjectives = TOPICS[topic]
    n1, n2, n3 = rng.sample(nouns, 3)
    a1, a2 = rng.sample(local_adjectives + ADJECTIVES, 2)
    abs1, abs2 = rng.sample(ABSTRACTS, 2)
    name, name2 = rng.sample(NAMES, 2)
    verb = rng.choice(VERBS)
    time = rng.choice(TIMES)
    fields = dict(n1=n1, n1b=n1, n2=n2, n3=n3, a1=a1, a2=a2, abs=abs1, abs2=abs2, Name=name, Name2=name2,
                  p=person, ps=people, Ps=_cap(people), v1s=verb[1], v1d=verb[2], adv=rng.choice(ADVERBS),
                  time=time, Time_cap=_cap(time), place=rng.choice(places), topic=topic,
                  Opener=rng.choice(OPENERS), a_p=_a(person), a_a1=_a(a1), A_a1=_cap(_a(a1)))
    return _cap(rng.choice(SENTENCES).format(**fields))


def essay(rng: random.Random) -> str:
    topic = rng.choice(list(TOPICS))
    nouns = TOPICS[topic][0]
    title = rng.choice(TITLES).format(Topic=_title(topic), N1=_title(rng.choice(nouns).removeprefix("the ")),
                                      Abs=_cap(rng.choice(ABSTRACTS)))
    paragraphs = [" ".join(sentence(rng, topic) for _ in range(rng.randint(4, 9)))
                  for _ in range(rng.randint(5, 11))]
    return "\n\n".join([title, *paragraphs])


def generate(target_chars: int = TARGET_CHARS, seed: str = SEED) -> str:
    rng = random.Random(seed)
    essays: list[str] = []
    size = 0
    while size < target_chars:
        essays.append(essay(rng))
        size += len(essays[-1]) + 2
    text = "\n\n".join(essays) + "\n"
    assert text.isascii() and not any(c.isdigit() for c in text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = generate()
    if args.check:
        same = args.out.is_file() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh run'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(args.out)
    print(f"{args.out}: {len(text):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
