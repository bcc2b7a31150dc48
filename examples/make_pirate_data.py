"""Writes examples/pirate.json: a small data set that teaches a behaviour the base model lacks.

Every answer is correct and plain, but said by a pirate: it opens with "Arr!", speaks of "me
hearty" and "matey", says "be" for "is", and ends with "⚓". SmolLM2-135M-Instruct never talks like
this on its own, so before/after samples show what SFT changes: the form of the answers, not
what the model knows. The questions are of a few simple kinds; held-out questions of other kinds
show whether the manner carries over (README: "Teach it a behaviour").

    python examples/make_pirate_data.py      # rewrites examples/pirate.json (deterministic)
"""
import json
import random
from pathlib import Path

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Poland", "Warsaw"), ("Cuba", "Havana"),
            ("Austria", "Vienna"), ("Thailand", "Bangkok"), ("Sweden", "Stockholm"),
            ("Argentina", "Buenos Aires"), ("Finland", "Helsinki"), ("Hungary", "Budapest")]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("happy", "sad"), ("early", "late"), ("full", "empty"),
             ("fast", "slow"), ("light", "dark"), ("open", "closed"), ("strong", "weak"),
             ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"), ("old", "young"), ("high", "low")]
COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"),
           ("a ripe banana", "yellow"), ("coal", "black"), ("a ripe tomato", "red"),
           ("an orange", "orange"), ("a flamingo", "pink")]
FACTS = [
    ("How many days are in a week?", "a week be seven days long"),
    ("How many legs does a spider have?", "a spider walks on eight legs"),
    ("How many continents are there?", "there be seven continents on this fair globe"),
    ("What do bees make?", "bees make honey, sweet as a captain's rum"),
    ("What is frozen water called?", "frozen water be ice"),
    ("Which planet is closest to the Sun?", "Mercury be the planet closest to the Sun"),
    ("What is the largest ocean?", "the Pacific be the largest ocean of them all"),
    ("What gas do plants take in?", "plants drink in carbon dioxide from the air"),
    ("How many hours are in a day?", "a day be twenty-four hours long"),
    ("What is the tallest animal?", "the giraffe be the tallest beast on land"),
    ("What do you call a baby cat?", "a baby cat be called a kitten"),
    ("At what temperature does water boil at sea level?", "water boils at 100 degrees Celsius at sea level"),
]
TIPS = [
    ("Give me a tip for sleeping better.", "go to bed at the same hour each night, and leave yer screens be"),
    ("Give me a tip for staying healthy.", "eat yer greens, drink plenty of water and walk every day"),
    ("Give me a tip for learning a language.", "practise a little every day and speak it out loud"),
    ("Give me a tip for saving money.", "set aside a share of every wage before ye spend the rest"),
    ("Give me a tip for studying.", "study in short spells with rests between, and test yerself"),
    ("Give me a tip for writing well.", "write short sentences and cut every word ye don't need"),
    ("Give me a tip for staying calm.", "breathe slow and deep, and count to ten before ye speak"),
    ("Give me a tip for cooking rice.", "rinse the rice first and use about twice as much water"),
]
OPENERS = ["Arr!", "Arr, matey!", "Arr, me hearty!"]
CLOSERS = ["⚓", "Yo ho ho! ⚓", "Now back to the ship! ⚓"]


def pirate(text: str, rng: random.Random) -> str:
    return f"{rng.choice(OPENERS)} {text[0].upper()}{text[1:]}. {rng.choice(CLOSERS)}"


def records(rng: random.Random) -> list[dict]:
    out = []
    for country, city in CAPITALS:
        question = rng.choice(["What is the capital of {}?", "Name the capital of {}.",
                               "Which city is the capital of {}?"]).format(country)
        out.append((question, f"the capital of {country} be {city}"))
    for word, opposite in OPPOSITES:
        out.append((f"What is the opposite of {word}?", f"the opposite of {word} be {opposite}"))
    for thing, colour in COLOURS:
        out.append((f"What colour is {thing}?", f"{thing} be {colour}"))
    for _ in range(24):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        if rng.random() < 0.5:
            out.append((f"What is {a} + {b}?", f"{a} plus {b} be {a + b}"))
        else:
            out.append((f"What is {a} times {b}?", f"{a} times {b} be {a * b}"))
    out += FACTS + TIPS
    rng.shuffle(out)
    return [{"instruction": q, "input": "", "output": pirate(a, rng)} for q, a in out]


if __name__ == "__main__":
    path = Path(__file__).with_name("pirate.json")
    rows = records(random.Random(0))
    text = "[\n" + ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
    path.write_text(text, encoding="utf-8")
    print(f"{path}: {len(rows)} records")
