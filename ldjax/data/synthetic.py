"""A small preference dataset that ldjax generates itself (no files, no downloads).

:func:`generate_preferences` writes HH-style records
(``prompt`` = ``"\\n\\nHuman: ...\\n\\nAssistant:"``, sometimes with an earlier turn) on six
topics -- recipes, travel, arithmetic word problems, definitions, writing requests, everyday
advice -- each with a helpful ``chosen`` response and a worse ``rejected`` one (a wrong answer,
wrong facts, rude, evasive or off-topic). Responses have 2-5 sentences, 80-400 characters, and
start with a space as in Anthropic-HH.

Besides ``prompt``/``chosen``/``rejected`` every record carries the probe types of the paper's
probe file that templates can make (:data:`ldjax.data.probes.PROBE_TYPES`):

- ``chosen_initial``: another helpful answer (other wording, other optional sentences);
- ``chosen_gptsemantic`` / ``reject_gptsemantic``: same content, other sentence templates plus
  synonym substitution (the paper's GPT rephrase keeping the meaning);
- ``chosen_gptformat`` / ``reject_gptformat``: the same sentence templates filled with other slot
  values (same format, another meaning);
- ``irr_hum``: a fluent passage unrelated to every topic.

``chosen_selfr`` is not made. ``irr_train``, ``irr_test``, ``random_permute``, ``random_nonhum``
come from :func:`ldjax.data.probes.build_probes` (or use :func:`generate_probe_set`).
Also stored: ``topic`` and ``reject_style`` (why the rejected response is worse).

Record i depends only on ``(seed, i)``, so ``generate_preferences(10)`` is a prefix of
``generate_preferences(500)``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from ldjax.data.probes import build_probes

__all__ = ["generate_preferences", "generate_probe_set", "TOPICS", "MIN_CHARS", "MAX_CHARS"]

MIN_CHARS, MAX_CHARS = 80, 400

# A sentence is a tuple of paraphrases (same meaning); a response plan is a list of
# (sentence, optional) pairs.
Plan = list


def _render(plan: Plan, slots: dict, choice: Sequence[int], keep: Sequence[bool]) -> str:
    parts = [
        _cap(alts[c % len(alts)].format(**slots))
        for (alts, _), c, k in zip(plan, choice, keep)
        if k
    ]
    return " " + " ".join(parts)


# Single-pass word/phrase substitutions (no chaining), chosen to keep the grammar intact.
_SYNONYMS = {
    "for about": "for approximately",
    "usually": "typically",
    "a great": "an excellent",
    "great": "excellent",
    "wonderful": "lovely",
    "beautiful": "lovely",
    "start": "begin",
    "Start": "Begin",
    "begin": "start",
    "often": "frequently",
    "pleasant": "mild",
    "maybe": "perhaps",
    "Maybe": "Perhaps",
    "be sure": "make sure",
    "a few": "several",
    "kids": "children",
    "buy": "purchase",
    "small": "little",
    "Honestly": "Frankly",
    "honestly": "frankly",
    "think": "believe",
    "store": "shop",
    "nice": "pleasant",
    "simple": "easy",
    "important": "essential",
    "probably": "likely",
    "Try": "Attempt",
    "really": "truly",
    "answer": "result",
    "friends": "pals",
    "popular": "well-liked",
    "visitors": "tourists",
    "choice": "option",
    "tricky": "difficult",
    "hard": "difficult",
    "correct": "right",
    "calculation": "computation",
    "process": "procedure",
    "for example": "for instance",
    "short": "brief",
    "quiet": "silent",
    "combined": "put together",
    "draft": "version",
    "confident": "certain",
    "complicated": "complex",
    "happy": "glad",
}
_SYN_RE = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, _SYNONYMS), key=len, reverse=True)) + r")\b"
)


def _synonyms(text: str) -> str:
    return _SYN_RE.sub(lambda m: _SYNONYMS[m.group(1)], text)


def _human(*turns: str) -> str:
    """Alternating Human/Assistant turns, ending with an open Assistant turn."""
    out = []
    for k, t in enumerate(turns):
        out.append(("\n\nHuman: " if k % 2 == 0 else "\n\nAssistant: ") + t)
    return "".join(out) + "\n\nAssistant:"


_OPENERS = [
    ("Hi there.", "Hello! What can I help you with today?"),
    ("Hey, I have a question.", "Sure, go ahead and ask."),
    ("Can you help me with something?", "Of course. What do you need?"),
]


def _prompt(rng: random.Random, question: str, lead: tuple | None = None) -> str:
    r = rng.random()
    if lead is not None and r < 0.25:
        return _human(lead[0], lead[1], question)
    if r < 0.4:
        return _human(*rng.choice(_OPENERS), question)
    return _human(question)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _join(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


# --------------------------------------------------------------------------------------------
# Topics. Each returns (question, lead or None, chosen plan, rejected plan, initial plan,
# slots, other slots (for *_gptformat), reject_style).
# --------------------------------------------------------------------------------------------

_DISHES = {
    "banana bread": (
        ["ripe bananas", "flour", "butter", "brown sugar", "eggs", "baking soda"],
        "mashing the bananas and stirring in the butter, sugar and eggs",
        "bake it at 350°F",
        60,
    ),
    "tomato soup": (
        ["canned tomatoes", "an onion", "garlic", "vegetable broth", "olive oil", "fresh basil"],
        "softening the onion and garlic in olive oil",
        "simmer everything with the tomatoes and broth",
        25,
    ),
    "pancakes": (
        ["flour", "milk", "eggs", "sugar", "baking powder", "melted butter"],
        "whisking the wet and dry ingredients separately and then combining them",
        "cook small rounds on a hot griddle",
        6,
    ),
    "fried rice": (
        ["cold cooked rice", "eggs", "soy sauce", "peas", "carrots", "green onions"],
        "scrambling the eggs in a hot pan and setting them aside",
        "stir-fry the rice and vegetables, then fold the eggs back in",
        10,
    ),
    "chicken curry": (
        ["chicken thighs", "an onion", "garlic", "ginger", "curry powder", "coconut milk"],
        "browning the chicken and cooking the onion, garlic and ginger with the spices",
        "simmer it all in the coconut milk",
        30,
    ),
    "lentil stew": (
        ["brown lentils", "carrots", "celery", "an onion", "cumin", "stock"],
        "chopping the vegetables and rinsing the lentils",
        "simmer them together in the stock",
        35,
    ),
    "oatmeal cookies": (
        ["rolled oats", "flour", "butter", "brown sugar", "an egg", "raisins"],
        "creaming the butter and sugar and then mixing in the egg",
        "bake spoonfuls of dough at 350°F",
        12,
    ),
    "guacamole": (
        ["ripe avocados", "lime juice", "red onion", "cilantro", "salt", "a jalapeño"],
        "mashing the avocados with the lime juice",
        "fold in the onion, cilantro and jalapeño and let it rest",
        5,
    ),
}


def _recipe(rng: random.Random):
    dish, other = rng.sample(sorted(_DISHES), 2)
    wrong = rng.choice([d for d in _DISHES if d not in (dish, other)])

    def slots_for(d, w):
        ings, prep, method, minutes = _DISHES[d]
        wings, _, wmethod, wminutes = _DISHES[w]
        k = rng.randint(3, 5)
        return dict(
            dish=d,
            ings=_join(ings[:k]),
            prep=prep,
            method=method,
            minutes=minutes,
            wrong_ings=_join(wings[:3]),
            wrong_method=wmethod,
            wrong_minutes=wminutes * 3 + 7,
        )

    slots, other_slots = slots_for(dish, wrong), slots_for(other, dish)
    question = rng.choice(
        [
            "How do I make {dish}?",
            "Can you give me a simple recipe for {dish}?",
            "I want to cook {dish} tonight. Where do I start?",
            "What do I need to make {dish} at home?",
        ]
    ).format(dish=dish)
    lead = ("I'm trying to cook more at home.", "That's a great goal! What would you like to make?")
    chosen = [
        (
            (
                "to make {dish}, you will need {ings}.",
                "for {dish} you'll want {ings}.",
                "a basic recipe for {dish} uses {ings}.",
            ),
            False,
        ),
        (("start by {prep}.", "the first step is {prep}."), False),
        (
            (
                "then {method} for about {minutes} minutes.",
                "after that, {method} for roughly {minutes} minutes.",
            ),
            False,
        ),
        (
            (
                "taste it as you go and adjust the seasoning at the end.",
                "check the flavor before serving and adjust it if needed.",
            ),
            True,
        ),
        (("enjoy your meal!", "I hope it turns out well!", "have fun cooking!"), True),
    ]
    style = rng.choice(["evasive", "rude", "wrong"])
    rejected = {
        "evasive": [
            (
                (
                    "I'm not really sure how to make {dish}.",
                    "honestly, I don't know much about {dish}.",
                ),
                False,
            ),
            (
                (
                    "you could probably find a recipe online somewhere.",
                    "maybe search the internet for it.",
                ),
                False,
            ),
            (
                (
                    "cooking takes a lot of time anyway, so ordering food might be easier.",
                    "a lot of people just order takeout instead.",
                ),
                True,
            ),
        ],
        "rude": [
            (
                (
                    "why would you want to make {dish}?",
                    "seriously, {dish}? That is a strange thing to cook.",
                ),
                False,
            ),
            (
                (
                    "just buy it at the store like everyone else.",
                    "go buy some at a store and stop wasting time.",
                ),
                False,
            ),
            (
                (
                    "it is not worth the effort for someone like you.",
                    "you would probably ruin it anyway.",
                ),
                True,
            ),
        ],
        "wrong": [
            (
                (
                    "to make {dish}, you mainly need {wrong_ings}.",
                    "the recipe for {dish} is based on {wrong_ings}.",
                ),
                False,
            ),
            (
                (
                    "just {wrong_method} for {wrong_minutes} minutes and it will be fine.",
                    "{wrong_method} for {wrong_minutes} minutes, no other steps are needed.",
                ),
                False,
            ),
            (("don't bother measuring anything.", "the amounts do not matter much."), True),
        ],
    }[style]
    initial = [
        (
            ("sure! It is not hard to make {dish} at home.", "{dish} can easily be made at home."),
            False,
        ),
        (("you need {ings}.", "gather {ings} before you begin."), False),
        (
            ("begin with {prep}, then {method}.", "do the prep first, {prep}, and then {method}."),
            False,
        ),
        (
            (
                "it should take about {minutes} minutes of cooking.",
                "plan for about {minutes} minutes of cooking time.",
            ),
            True,
        ),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


_CITIES = {
    "Paris": (
        "France",
        ["the Louvre", "the Eiffel Tower", "Montmartre"],
        "spring",
        "fresh croissants",
    ),
    "Kyoto": (
        "Japan",
        ["Fushimi Inari Shrine", "the Arashiyama bamboo grove", "Kinkaku-ji"],
        "autumn",
        "matcha sweets",
    ),
    "Rome": (
        "Italy",
        ["the Colosseum", "the Pantheon", "the Vatican Museums"],
        "late spring",
        "cacio e pepe",
    ),
    "Lisbon": (
        "Portugal",
        ["the Belém Tower", "the Alfama district", "the São Jorge Castle"],
        "early autumn",
        "pastéis de nata",
    ),
    "Mexico City": (
        "Mexico",
        ["the Zócalo", "the Frida Kahlo Museum", "Chapultepec Park"],
        "spring",
        "tacos al pastor",
    ),
    "Istanbul": (
        "Turkey",
        ["the Hagia Sophia", "the Grand Bazaar", "a Bosphorus ferry"],
        "autumn",
        "simit and Turkish tea",
    ),
    "Cape Town": (
        "South Africa",
        ["Table Mountain", "the V&A Waterfront", "Boulders Beach"],
        "summer",
        "grilled fish",
    ),
    "Reykjavik": (
        "Iceland",
        ["Hallgrímskirkja", "the Sun Voyager sculpture", "the Blue Lagoon"],
        "summer",
        "Icelandic hot dogs",
    ),
    "Bangkok": (
        "Thailand",
        ["the Grand Palace", "Wat Arun", "the Chatuchak market"],
        "the cool season from November to February",
        "pad thai",
    ),
    "New York": (
        "the United States",
        ["Central Park", "the Metropolitan Museum of Art", "the Brooklyn Bridge"],
        "autumn",
        "a classic bagel",
    ),
}


def _travel(rng: random.Random):
    city, other = rng.sample(sorted(_CITIES), 2)
    wrong = rng.choice([c for c in _CITIES if c not in (city, other)])

    def slots_for(c, w):
        country, sights, season, food = _CITIES[c]
        s = rng.sample(sights, 3)
        wcountry, wsights, _, _ = _CITIES[w]
        return dict(
            city=c,
            country=country,
            s1=s[0],
            s2=s[1],
            s3=s[2],
            season=season,
            food=food,
            other_city=w,
            w1=wsights[0],
            w2=wsights[1],
            wcountry=wcountry,
        )

    slots, other_slots = slots_for(city, wrong), slots_for(other, city)
    question = rng.choice(
        [
            "I'm planning a trip to {city}. What should I see?",
            "What are the best things to do in {city}?",
            "When is a good time to visit {city}, and what should I do there?",
            "I have three days in {city}. Any tips?",
        ]
    ).format(city=city)
    lead = (
        "I have a week of vacation coming up.",
        "That sounds wonderful! Do you have a destination in mind?",
    )
    chosen = [
        (("{city} is a great choice.", "{city} is a wonderful place to visit."), False),
        (
            ("many visitors start with {s1} and {s2}.", "two popular places are {s1} and {s2}."),
            False,
        ),
        (
            (
                "if you have more time, {s3} is also worth a visit.",
                "with an extra day, you could also see {s3}.",
            ),
            True,
        ),
        (
            (
                "the weather is usually pleasant in {season}.",
                "{season} tends to be a nice time to go.",
            ),
            False,
        ),
        (("don't forget to try {food}.", "be sure to taste {food} while you are there."), True),
    ]
    style = rng.choice(["evasive", "offtopic", "wrong"])
    rejected = {
        "evasive": [
            (
                (
                    "there are lots of places in the world to visit.",
                    "travel is different for everyone.",
                ),
                False,
            ),
            (
                (
                    "I can't really tell you what to do in {city}.",
                    "it's hard to say what you would like in {city}.",
                ),
                False,
            ),
            (
                (
                    "have you thought about just staying home and saving money?",
                    "maybe a trip is not a good idea right now.",
                ),
                True,
            ),
        ],
        "offtopic": [
            (
                (
                    "honestly, {other_city} is much nicer than {city}.",
                    "{other_city} is a better destination than {city}.",
                ),
                False,
            ),
            (
                ("you should see {w1} and {w2} there instead.", "go to {w1} and {w2} instead."),
                False,
            ),
            (
                (
                    "people always say {other_city} is the best city in {wcountry}.",
                    "{other_city} is the real highlight of {wcountry}.",
                ),
                True,
            ),
        ],
        "wrong": [
            (
                (
                    "{city} is best known for {w1} and {w2}.",
                    "the main sights of {city} are {w1} and {w2}.",
                ),
                False,
            ),
            (
                (
                    "it is the capital of {wcountry}, so it gets very busy.",
                    "{city} is in {wcountry}, so plan for crowds.",
                ),
                False,
            ),
            (
                (
                    "go in any season, it makes no difference.",
                    "the time of year does not matter at all.",
                ),
                True,
            ),
        ],
    }[style]
    initial = [
        (("you will have a lot to do in {city}.", "there is plenty to do in {city}."), False),
        (
            (
                "I would put {s2} and {s3} at the top of your list.",
                "I'd recommend {s2} and {s3} first.",
            ),
            False,
        ),
        (
            ("try to go in {season} if you can.", "{season} is usually the best time to visit."),
            False,
        ),
        (
            (
                "and leave some time to wander around and eat {food}.",
                "save an evening for {food} and a walk.",
            ),
            True,
        ),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


_NAMES = ["Sam", "Maria", "Ali", "Priya", "John", "Mei", "Lucas", "Fatima", "Noah", "Aisha"]
_ITEMS = [
    "apple",
    "pencil",
    "marble",
    "cookie",
    "sticker",
    "book",
    "orange",
    "card",
    "shell",
    "coin",
]


def _arith_slots(rng: random.Random, op: str) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if op == "add":
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        ans, expr = a + b, f"{a} + {b}"
    elif op == "sub":
        a = rng.randint(12, 90)
        b = rng.randint(2, a - 3)
        ans, expr = a - b, f"{a} - {b}"
    elif op == "mul":
        a, b = rng.randint(2, 12), rng.randint(3, 15)
        ans, expr = a * b, f"{a} × {b}"
    else:  # div
        b, ans = rng.randint(2, 9), rng.randint(2, 12)
        a = ans * b
        expr = f"{a} ÷ {b}"
    wrong = ans + rng.choice([-3, -2, -1, 1, 2, 5, 10])
    return dict(name=name, item=item, a=a, b=b, ans=ans, expr=expr, wrong=wrong)


_ARITH_Q = {
    "add": "{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?",
    "sub": "{name} had {a} {item}s and gave {b} of them to a friend. How many {item}s are left?",
    "mul": "There are {a} boxes with {b} {item}s in each box. How many {item}s are there in total?",
    "div": (
        "{name} shares {a} {item}s equally among {b} friends. "
        "How many {item}s does each friend get?"
    ),
}
_ARITH_WHY = {
    "add": (
        "we add the {b} new {item}s to the {a} that {name} already had.",
        "the {a} {item}s and the {b} new ones are combined.",
    ),
    "sub": (
        "we take the {b} {item}s that were given away from the {a}.",
        "giving away {b} {item}s leaves {a} minus {b}.",
    ),
    "mul": (
        "{a} boxes of {b} {item}s means multiplying.",
        "each of the {a} boxes adds {b} {item}s, so we multiply.",
    ),
    "div": (
        "sharing equally means dividing {a} by {b}.",
        "we split the {a} {item}s into {b} equal groups.",
    ),
}


def _arithmetic(rng: random.Random):
    op = rng.choice(["add", "sub", "mul", "div"])
    slots, other_slots = _arith_slots(rng, op), _arith_slots(rng, op)
    question = rng.choice(
        ["", "Can you help with my homework? ", "Quick math question: "]
    ) + _ARITH_Q[op].format(**slots)
    lead = ("I have a math question.", "Happy to help! What is the problem?")
    why = _ARITH_WHY[op]
    chosen = [
        (why, False),
        (("so the calculation is {expr} = {ans}.", "that gives {expr} = {ans}."), False),
        (("the answer is {ans} {item}s.", "so there are {ans} {item}s."), False),
        (
            (
                "you can check it by working backwards from {ans}.",
                "it is a good habit to check the result by working backwards.",
            ),
            True,
        ),
    ]
    style = rng.choice(["wrong", "wrong", "evasive"])
    rejected = {
        "wrong": [
            (why, True),
            (("the calculation is {expr} = {wrong}.", "that gives {expr} = {wrong}."), False),
            (("so the answer is {wrong} {item}s.", "there are {wrong} {item}s."), False),
            (
                (
                    "I am confident this is correct, no need to check it.",
                    "that one was easy, no need to double check.",
                ),
                False,
            ),
        ],
        "evasive": [
            (
                ("word problems like this can be tricky.", "math homework is not really my thing."),
                False,
            ),
            (
                ("you should probably ask your teacher about it.", "maybe try a calculator app."),
                False,
            ),
            (
                (
                    "it depends on how you read the question about the {item}s.",
                    "it is hard to say how many {item}s there are.",
                ),
                False,
            ),
        ],
    }[style]
    initial = [
        (("let's work it out step by step.", "here is how to solve it."), False),
        (why, False),
        (
            (
                "{expr} = {ans}, so the answer is {ans} {item}s.",
                "the result is {ans} {item}s, because {expr} = {ans}.",
            ),
            False,
        ),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


_TERMS = {
    "photosynthesis": (
        "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen",
        "it happens mostly in the leaves, inside small structures called chloroplasts",
    ),
    "gravity": (
        "the force that pulls objects with mass toward each other",
        "it is why a dropped apple falls to the ground and why the Moon orbits the Earth",
    ),
    "inflation": (
        "a general rise in prices over time, so the same money buys less",
        "if bread cost two dollars last year and costs more now, that is inflation at work",
    ),
    "a prime number": (
        "a whole number greater than one that can only be divided evenly by one and itself",
        "2, 3, 5, 7 and 11 are prime, but 9 is not because 3 × 3 = 9",
    ),
    "a metaphor": (
        "a figure of speech that describes something by saying it is something else",
        "saying that time is a thief is a metaphor, because time does not really steal",
    ),
    "an atom": (
        "the smallest unit of a chemical element, made of a nucleus with electrons around it",
        "everything around you, from air to water, is made of atoms",
    ),
    "a volcano": (
        "an opening in the Earth's crust where molten rock, ash and gas escape",
        "Mount Etna in Italy is one of the most active volcanoes in the world",
    ),
    "democracy": (
        "a system of government in which citizens choose their leaders by voting",
        "in many democracies people vote in elections every few years",
    ),
    "evaporation": (
        "the process in which a liquid turns into a gas, usually when it is heated",
        "a puddle slowly disappearing on a sunny day is a simple example",
    ),
    "an ecosystem": (
        "a community of living things together with the environment they live in",
        "a pond, with its fish, insects, plants and water, is a small ecosystem",
    ),
    "a vaccine": (
        "a preparation that trains the immune system to recognize a germ "
        "without causing the disease",
        "after a vaccine, the body can fight off that germ faster if it meets it later",
    ),
    "a noun": (
        "a word that names a person, place, thing or idea",
        "in the sentence 'the dog ran home', the words dog and home are nouns",
    ),
}


def _definition(rng: random.Random):
    term, other = rng.sample(sorted(_TERMS), 2)
    wrong = rng.choice([t for t in _TERMS if t not in (term, other)])

    def slots_for(t, w):
        return dict(
            term=t, body=_TERMS[t][0], example=_TERMS[t][1], wrong_body=_TERMS[w][0], wrong_term=w
        )

    slots, other_slots = slots_for(term, wrong), slots_for(other, term)
    question = rng.choice(
        [
            "What is {term}?",
            "Can you explain what {term} is?",
            "My kid asked me what {term} is. How should I explain it?",
            "I never really understood {term}. What is it?",
        ]
    ).format(term=term)
    lead = ("I have a question about a word.", "Sure, which word is it?")
    chosen = [
        (
            ("{term} is {body}.", "simply put, {term} is {body}.", "in short, {term} is {body}."),
            False,
        ),
        (("{example}.", "as an example, {example}."), False),
        (
            ("I hope that helps.", "let me know if you want more detail.", "does that make sense?"),
            True,
        ),
    ]
    style = rng.choice(["wrong", "evasive", "rude"])
    rejected = {
        "wrong": [
            (("{term} is {wrong_body}.", "basically, {term} is {wrong_body}."), False),
            (
                ("at least, that is how I remember it.", "I think that is right, more or less."),
                False,
            ),
        ],
        "evasive": [
            (
                (
                    "that is a complicated question and there are many opinions about {term}.",
                    "{term} can mean a lot of different things to different people.",
                ),
                False,
            ),
            (
                (
                    "you should look it up in a dictionary or ask a teacher.",
                    "maybe ask someone who studied it.",
                ),
                False,
            ),
        ],
        "rude": [
            (("everyone knows what {term} is.", "how do you not know what {term} is?"), False),
            (
                (
                    "you should have paid attention in school instead of asking me.",
                    "look it up yourself next time.",
                ),
                False,
            ),
        ],
    }[style]
    initial = [
        (("good question!", "sure, I can explain."), False),
        (("{term} is {body}.", "people use the word for {body}."), False),
        (("for example, {example}.", "{example}."), True),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


_WRITING = [
    (
        "a thank-you note to my aunt for the scarf she knitted",
        "Dear Aunt Rose, thank you so much for the beautiful scarf you knitted for me",
        "I have worn it almost every day since it arrived",
        "Love, Emma",
    ),
    (
        "a short apology to my boss for being late this morning",
        "Dear Ms. Carter, I am sorry for arriving late to work this morning",
        "I have already adjusted my schedule so it will not happen again",
        "Best regards, Daniel",
    ),
    (
        "a birthday message for my older brother",
        "Happy birthday, Tom! I hope your day is full of good food and good company",
        "thank you for always looking out for me",
        "Your favorite sibling, Jess",
    ),
    (
        "a note to my neighbor asking them to keep the music down at night",
        "Hi Mr. Lee, I hope you are doing well",
        "could you please keep the music a little lower after ten at night? I start work early",
        "Thanks so much, Anna",
    ),
    (
        "a message congratulating my friend on her new job",
        "Congratulations, Sara! I just heard about your new job and I am so happy for you",
        "they are lucky to have you on the team",
        "Cheers, Mike",
    ),
    (
        "an invitation to my coworkers for a Friday lunch",
        "Hi everyone, would you like to join me for lunch this Friday at noon",
        "I thought we could try the new noodle place around the corner",
        "See you there, Chris",
    ),
]


def _writing(rng: random.Random):
    (task, l1, l2, sign), (otask, o1, o2, osign) = rng.sample(_WRITING, 2)
    slots = dict(task=task, l1=l1, l2=l2, sign=sign)
    other_slots = dict(task=otask, l1=o1, l2=o2, sign=osign)
    question = rng.choice(
        [
            "Can you help me write {task}?",
            "I need to write {task}. Can you draft it?",
            "Please write {task}.",
        ]
    ).format(task=task)
    lead = (
        "I'm bad at writing messages.",
        "I'm happy to help you with that. What do you need to write?",
    )
    chosen = [
        (("of course! Here is a short draft:", "sure, here is something you could send:"), False),
        (('"{l1}. {l2_cap}. {sign}"',), False),
        (
            (
                "feel free to change the wording so it sounds like you.",
                "you can adjust it to match your own style.",
            ),
            True,
        ),
    ]
    slots["l2_cap"], other_slots["l2_cap"] = _cap(l2), _cap(o2)
    style = rng.choice(["rude", "evasive", "offtopic"])
    rejected = {
        "rude": [
            (
                (
                    "write it yourself, it is only {task}.",
                    "why can't you write {task} on your own?",
                ),
                False,
            ),
            (("I am not your personal secretary.", "this is a waste of my time."), False),
        ],
        "evasive": [
            (
                (
                    "writing messages is very personal, so I can't really help.",
                    "it is hard to know what to say in {task}.",
                ),
                False,
            ),
            (
                (
                    "maybe just send a short text or an emoji instead.",
                    "you could skip writing it and call them instead.",
                ),
                False,
            ),
        ],
        "offtopic": [
            (
                (
                    "did you know that letters used to be delivered by horse riders?",
                    "the history of the postal service is actually really interesting.",
                ),
                False,
            ),
            (
                (
                    "the first postage stamp was printed in 1840 in Britain.",
                    "stamps became common in the nineteenth century.",
                ),
                False,
            ),
        ],
    }[style]
    initial = [
        (("here is one option:", "you could write something like this:"), False),
        (('"{l1}. {l2_cap}."',), False),
        (("then sign it with your name.", "end with a warm closing and your name."), False),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


_ADVICE = {
    "falling asleep at night": [
        (
            "go to bed and wake up at the same time every day",
            "keep a regular sleep schedule, even on weekends",
        ),
        ("avoid screens for an hour before bed", "put your phone away well before bedtime"),
        (
            "keep your bedroom cool, dark and quiet",
            "make the bedroom dark, quiet and a little cool",
        ),
        ("skip coffee after lunch", "avoid caffeine in the afternoon and evening"),
    ],
    "starting to exercise as a beginner": [
        ("start with short walks of twenty minutes", "begin with brisk twenty-minute walks"),
        (
            "add a little more each week instead of doing too much at once",
            "increase the effort slowly from week to week",
        ),
        (
            "pick an activity you enjoy so you keep doing it",
            "choose a sport or activity that you find fun",
        ),
        ("rest when something hurts", "take a break if you feel pain"),
    ],
    "studying better for exams": [
        (
            "study in short sessions with breaks in between",
            "work in blocks of about half an hour with short breaks",
        ),
        (
            "test yourself instead of only rereading your notes",
            "practice recalling the material rather than just rereading",
        ),
        (
            "start a few weeks early rather than the night before",
            "spread your studying over several weeks",
        ),
        ("sleep well before the exam", "get a full night of sleep before the test"),
    ],
    "saving more money each month": [
        ("write down what you spend for a month", "track every expense for a few weeks"),
        (
            "set up an automatic transfer to savings on payday",
            "move a fixed amount into savings as soon as you are paid",
        ),
        ("cook at home more often", "eat out less and cook more meals yourself"),
        (
            "cancel subscriptions you no longer use",
            "drop the subscriptions you have forgotten about",
        ),
    ],
    "dealing with stress at work": [
        (
            "take short breaks during the day",
            "step away from your desk for a few minutes every couple of hours",
        ),
        (
            "make a list of tasks and do the most important one first",
            "prioritize your tasks and tackle the hardest first",
        ),
        (
            "talk to your manager if the workload is too heavy",
            "let your manager know when you have too much to do",
        ),
        ("get some exercise after work", "go for a walk or a workout in the evening"),
    ],
}


def _advice(rng: random.Random):
    topic, other = rng.sample(sorted(_ADVICE), 2)

    def slots_for(t):
        tips = rng.sample(_ADVICE[t], 3)
        s = dict(topic=t)
        for k, (a, b) in enumerate(tips):
            s[f"t{k}a"], s[f"t{k}b"] = a, b
        return s

    slots, other_slots = slots_for(topic), slots_for(other)
    question = rng.choice(
        [
            "I need some advice on {topic}.",
            "Do you have any tips for {topic}?",
            "I've been struggling with {topic}. What can I do?",
        ]
    ).format(topic=topic)
    lead = ("I could use some advice.", "Sure, I'll do my best. What's going on?")
    chosen = [
        (
            (
                "here are a few things that often help with {topic}.",
                "a few habits can make a real difference with {topic}.",
            ),
            False,
        ),
        (("first, {t0a}.", "to begin, {t0b}."), False),
        (("second, {t1a}.", "it also helps to {t1b}."), False),
        (("finally, {t2a}.", "and lastly, {t2b}."), True),
    ]
    style = rng.choice(["evasive", "rude", "offtopic"])
    rejected = {
        "evasive": [
            (
                (
                    "everyone is different, so I can't really say what will work for {topic}.",
                    "there is no single answer for {topic}.",
                ),
                False,
            ),
            (
                (
                    "have you tried just not worrying about it?",
                    "maybe it will sort itself out on its own.",
                ),
                False,
            ),
        ],
        "rude": [
            (
                (
                    "that sounds like your problem, not mine.",
                    "lots of people manage {topic} without complaining.",
                ),
                False,
            ),
            (("you just need to try harder.", "stop making excuses and figure it out."), False),
        ],
        "offtopic": [
            (
                (
                    "speaking of habits, I think {other} is a much more interesting subject.",
                    "let's talk about {other} instead.",
                ),
                False,
            ),
            (("the usual tip there is to {o0b}.", "people often say you should {o0b}."), False),
        ],
    }[style]
    slots.update(other=other, o0b=other_slots["t0b"])
    other_slots.update(other=topic, o0b=slots["t0b"])
    initial = [
        (
            (
                "that is a common problem, and it usually gets better with a few changes.",
                "you are not alone, and small changes can help.",
            ),
            False,
        ),
        (("try to {t1b}.", "one idea is to {t1b}."), False),
        (("you could also {t2b}.", "and consider trying to {t2b}."), False),
        (
            (
                "give it a couple of weeks before judging the results.",
                "be patient, it can take a few weeks.",
            ),
            True,
        ),
    ]
    return question, lead, chosen, rejected, initial, slots, other_slots, style


TOPICS: dict[str, Callable] = {
    "recipe": _recipe,
    "travel": _travel,
    "arithmetic": _arithmetic,
    "definition": _definition,
    "writing": _writing,
    "advice": _advice,
}
"""Topic name -> template function."""


_HUM = [
    "the {adj} {animal} wandered across the {place} {time}.",
    "old photographs in the attic were covered with dust and forgotten stories.",
    "on {day} mornings the harbor fills with the cries of gulls and the creak of wooden boats.",
    "a {weather} wind rolled over the {landscape}, bending the tall grass toward the river.",
    "the {adj} {animal} watched the {place} quietly as the light faded {time}.",
    "somewhere beyond the hills a church bell rang twice and then fell silent.",
    "the library smelled of old paper, and the clock above the door ticked slowly.",
    "children chased each other along the {landscape} while the kites drifted overhead.",
]
_HUM_SLOTS = dict(
    adj=["curious", "sleepy", "patient", "restless", "graceful", "tiny"],
    animal=["cat", "fox", "heron", "rabbit", "deer", "owl"],
    place=["meadow", "orchard", "frozen lake", "quiet garden", "valley"],
    time=["all afternoon", "at dusk", "before dawn", "in the evening"],
    day=["Sunday", "foggy", "winter", "summer"],
    weather=["cold", "gentle", "salty", "warm"],
    landscape=["open fields", "sand dunes", "rolling hills", "empty beach"],
)


def _irr_hum(rng: random.Random) -> str:
    slots = {k: rng.choice(v) for k, v in _HUM_SLOTS.items()}
    k = rng.randint(2, 3)
    return " " + " ".join(_cap(s.format(**slots)) for s in rng.sample(_HUM, k))


def _make_record(rng: random.Random, topic: str) -> dict:
    question, lead, chosen, rejected, initial, slots, other_slots, style = TOPICS[topic](rng)
    prompt = _prompt(rng, question, lead)

    def draw(plan):
        choice = [rng.randrange(len(alts)) for alts, _ in plan]
        keep = [(not opt) or rng.random() < 0.5 for _, opt in plan]
        return choice, keep

    def rephrase(choice, plan):  # another paraphrase of every sentence that has one
        return [(c + 1) % len(alts) for c, (alts, _) in zip(choice, plan)]

    cc, ck = draw(chosen)
    rc, rk = draw(rejected)
    ic, ik = draw(initial)
    rec = {
        "prompt": prompt,
        "chosen": _render(chosen, slots, cc, ck),
        "chosen_initial": _render(initial, slots, ic, ik),
        "chosen_gptsemantic": _synonyms(_render(chosen, slots, rephrase(cc, chosen), ck)),
        "chosen_gptformat": _render(chosen, other_slots, cc, ck),
        "rejected": _render(rejected, slots, rc, rk),
        "reject_gptsemantic": _synonyms(_render(rejected, slots, rephrase(rc, rejected), rk)),
        "reject_gptformat": _render(rejected, other_slots, rc, rk),
        "irr_hum": _irr_hum(rng),
        "topic": topic,
        "reject_style": style,
    }
    return rec


_LENGTH_CHECKED = (
    "chosen",
    "chosen_initial",
    "chosen_gptsemantic",
    "chosen_gptformat",
    "rejected",
    "reject_gptsemantic",
    "reject_gptformat",
    "irr_hum",
)


def generate_preferences(n: int = 500, seed: int = 0) -> list[dict]:
    """``n`` synthetic HH-style preference records (see the module docstring for the fields).

    Deterministic: record i depends only on ``(seed, i)``. Every response field listed in
    the module docstring has ``MIN_CHARS <= len <= MAX_CHARS`` and
    ``chosen != rejected``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    topics = sorted(TOPICS)
    out = []
    for i in range(n):
        rng = random.Random(f"ldjax-synthetic:{seed}:{i}")
        topic = rng.choice(topics)
        for _ in range(100):  # redraw the optional sentences until every length fits
            rec = _make_record(rng, topic)
            if (
                all(MIN_CHARS <= len(rec[f]) <= MAX_CHARS for f in _LENGTH_CHECKED)
                and rec["chosen"] != rec["rejected"]
            ):
                break
        else:  # pragma: no cover - the templates are built to fit
            raise RuntimeError(
                f"synthetic record {i} (topic {topic}) did not fit {MIN_CHARS}-{MAX_CHARS} chars"
            )
        out.append(rec)
    return out


def generate_probe_set(n: int = 500, seed: int = 0, n_test: int | None = None) -> list[dict]:
    """:func:`generate_preferences` followed by :func:`ldjax.data.probes.build_probes`: records
    with every probe type except ``chosen_selfr`` (``n - n_test`` of them; held-out records
    supply ``irr_test``)."""
    return build_probes(generate_preferences(n, seed), seed=seed, n_test=n_test)
