"""MiniChat: the built-in task. It plays the human writers and the human labelers of InstructGPT.

Everything the pipeline needs from people is generated here, deterministically from seeds, with no download, in a
closed lexicon (~650 words, ASCII) small enough for a 512-1024 token BPE and a 1-5M parameter GPT on a laptop CPU:

  prompts         a user's request about one of 30 topics ("My friend Anna wants to learn about the sea. What
                  should I tell her?"), ~1M distinct strings, split train/held-out by a stable hash.
  demonstrations  written by a simulated crowd of mixed quality (good, off-topic, rude, rambling, repetitive), so
                  supervised fine-tuning learns a grammatical but mediocre average: there is room for RLHF.
  gold            the hidden human preference: a deterministic score with a known optimum (4.0). Only the final
                  evaluation reads it; the reward model never sees it.
  rank            the noisy labeler: a Plackett-Luce draw around gold. This is what the reward model trains on.

A response is a plain string: the assistant's text after "Assistant:" without the leading space. The pipeline
renders "\\n\\nHuman: {request}\\n\\nAssistant: {response}" and appends EOS; `eos` says whether the model ended the
response with EOS (always True for demonstrations, False when sampling hit the length limit).

The gold labeler, exactly. A response is split into sentences at ". ", "! ", "? " and the end of the text. It is
*well formed* when it has EOS, is non-empty, and every sentence is in VALID_SENTENCES with exactly one space
between sentences. Then, reading the sentences in order:

    malformed or no EOS                          → gold = −4.0 flat (the floor; no other term applies)
    a sentence already seen in this response     → −1.0   (repeat, whatever its kind)
    an on-topic fact (the request's topic)       → +1.0 for each of the first 3 distinct ones, 0 after
    an off-topic fact (any other topic)          → −1.0
    a rude line                                  → −1.5
    a polite opener as the first sentence        → +0.5
    a polite closer as the last sentence         → +0.5
    any other polite line (stacked or misplaced) → −0.5
    length                                       → −0.25 per word beyond 30 words

    gold = min(on, 3) − off − repeats − 1.5·rude + 0.5·opener + 0.5·closer − 0.5·extra_polite − 0.25·max(0, words − 30)

The best answer (opener, 3 distinct on-topic facts, closer, ≤ 30 words) scores 4.0; the crowd's demos average
about +0.7 with a standard deviation about 2.3 (good writers +3.1, the other personas between −1.7 and −0.4; the
CLI prints the report). The formula leaves "exploits" that a learned reward model may overrate: a 4th or 5th
on-topic fact (more topic words, capped at zero gain, and past 30 words it costs), stacked polite lines (liked in
good demos, −0.5 each when stacked).

Reads nothing. Writes, under --out_dir:
  sft_train.jsonl   {"prompt", "response"} demos on train prompts        (supervised fine-tuning)
  sft_val.jsonl     {"prompt", "response"} demos on held-out prompts     (SFT validation loss)
  prompts_train.jsonl, prompts_val.jsonl   {"prompt"}                    (reward-model comparisons, PPO, eval)
  corpus.txt        the rendered train demos                             (BPE training)
  meta.json         the settings they were made with (common.prepare_builtin regenerates files made with others)

Run: python -m data.minichat --out_dir=data/minichat --n_sft=20000 --n_prompts=20000 --seed=0
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import time

# -----------------------------------------------------------------------------
# The lexicon: 30 topics. Each topic is (key, plural, adjectives, "can" phrases, free facts).
# The key is how requests name the topic, and every fact about the topic contains it, so topicality can be checked
# by eye (and is, in the tests). No key appears inside another topic's sentences or in the request templates.

TOPIC_TABLE = [
    ("cats", True, ["soft", "curious", "playful", "quiet"],
     ["purr when they are happy", "sleep most of the day", "jump very high", "see well in the dark"],
     ["Cats like to nap in the sun.", "Cats clean their fur with their tongue.", "Many cats chase small toys."]),
    ("dogs", True, ["loyal", "friendly", "smart", "happy"],
     ["learn many tricks", "smell things from far away", "help people who cannot see", "guard a house"],
     ["Dogs love to go for long walks.", "Dogs wag their tails when they are glad.", "Dogs need food, water and love."]),
    ("horses", True, ["strong", "fast", "gentle", "tall"],
     ["run for many miles", "sleep standing up", "pull a heavy cart", "carry a rider"],
     ["Horses eat grass and hay.", "Horses live in a stable or a field.", "People have ridden horses for a long time."]),
    ("birds", True, ["light", "colorful", "clever", "busy"],
     ["fly over the land", "sing in the morning", "build a nest", "find their way home"],
     ["Birds lay eggs in a nest.", "Birds have feathers and wings.", "Some birds fly south for the cold months."]),
    ("bees", True, ["busy", "small", "fuzzy", "useful"],
     ["make sweet honey", "dance to share news", "carry pollen", "work as a team"],
     ["Bees live in a hive.", "Bees visit many plants each day.", "Bees help fruit grow."]),
    ("rain", False, ["wet", "cool", "common", "gentle"],
     ["make the grass green", "fill a lake", "cool a hot day", "fall for many hours"],
     ["Rain comes from clouds in the sky.", "Rain helps plants grow.", "Rain makes a soft sound on the roof."]),
    ("the sea", False, ["big", "deep", "salty", "blue"],
     ["be calm or wild", "hide many strange animals", "change color with the sky", "make loud waves"],
     ["The sea covers most of the earth.", "Whales and sharks live in the sea.", "The sea has tides that rise and fall."]),
    ("the moon", False, ["bright", "round", "old", "quiet"],
     ["light up the night", "pull on the ocean", "look orange at times", "be seen in the day"],
     ["The moon goes around the earth.", "People have walked on the moon.", "The moon has no air."]),
    ("stars", True, ["bright", "hot", "huge", "distant"],
     ["shine for billions of years", "help sailors find their way", "form shapes in the sky", "look like tiny dots"],
     ["Stars are made of hot gas.", "You can see more stars far from the city.", "Our sun is one of the stars."]),
    ("winter", False, ["cold", "dark", "long", "quiet"],
     ["bring ice and frost", "make the days short", "be fun for kids", "last for months"],
     ["In winter people wear warm coats.", "Many animals sleep through the winter.", "Winter is a good time for hot drinks."]),
    ("summer", False, ["warm", "bright", "sunny", "lazy"],
     ["bring long days", "make the grass dry", "be great for a swim", "feel very hot"],
     ["In summer kids have time off from school.", "Summer is a good time for picnics.", "Many people travel in summer."]),
    ("rivers", True, ["long", "wide", "fast", "clear"],
     ["carve deep valleys", "flow to the ocean", "flood after a storm", "give water to towns"],
     ["Rivers start high in the hills.", "Fish swim in rivers.", "People build bridges over rivers."]),
    ("mountains", True, ["tall", "rocky", "steep", "cold"],
     ["have snow on top", "take days to climb", "make their own weather", "be very old"],
     ["Mountains form over millions of years.", "Goats can climb steep mountains.", "Many people hike in the mountains."]),
    ("forests", True, ["green", "deep", "dark", "calm"],
     ["clean the air", "shelter many animals", "grow for centuries", "be hard to walk through"],
     ["Forests are full of tall trees.", "Deer and foxes live in forests.", "Forests need water to stay healthy."]),
    ("gardens", True, ["green", "pretty", "peaceful", "bright"],
     ["grow fresh food", "attract butterflies", "need a lot of care", "look nice all year"],
     ["Gardens need sun and water.", "Many people relax in their gardens.", "Gardens come in every size."]),
    ("coffee", False, ["hot", "bitter", "dark", "strong"],
     ["wake you up", "keep you up at night", "smell very good", "taste sweet with milk"],
     ["Coffee is made from roasted beans.", "Many people drink coffee in the morning.", "Coffee grows in warm places."]),
    ("tea", False, ["warm", "mild", "calming", "popular"],
     ["be green or black", "calm you down", "taste nice with honey", "be served cold"],
     ["Tea is made from dried leaves.", "In some places people drink tea every day.", "Tea goes well with a small cake."]),
    ("bread", False, ["soft", "warm", "fresh", "tasty"],
     ["be baked at home", "go stale in a few days", "be made with many grains", "smell wonderful"],
     ["Bread is made from flour and water.", "Bread rises because of yeast.", "People eat bread all over the world."]),
    ("apples", True, ["sweet", "crisp", "red", "juicy"],
     ["be green or red", "keep for weeks", "be baked in a pie", "grow on tall trees"],
     ["Apples are a healthy snack.", "Apples are picked in the fall.", "There are many kinds of apples."]),
    ("cheese", False, ["tasty", "rich", "salty", "creamy"],
     ["be hard or soft", "last for years", "melt on hot food", "smell very strong"],
     ["Cheese is made from milk.", "Mice are said to love cheese.", "Cheese goes well with crackers."]),
    ("soup", False, ["warm", "tasty", "filling", "simple"],
     ["be made with many vegetables", "warm you up", "be eaten hot or cold", "help when you feel sick"],
     ["Soup is easy to make at home.", "People eat soup with a spoon.", "Soup is great on a cold day."]),
    ("trains", True, ["fast", "long", "loud", "safe"],
     ["carry many people", "run on electric power", "cross whole countries", "move heavy goods"],
     ["Trains run on metal tracks.", "Trains stop at stations.", "Some trains travel under the ground."]),
    ("bikes", True, ["light", "quick", "cheap", "quiet"],
     ["take you to work", "be ridden on trails", "go fast downhill", "fold up small"],
     ["Bikes have two wheels.", "Riding bikes is good exercise.", "Bikes do not need fuel."]),
    ("boats", True, ["sturdy", "slow", "small", "sleek"],
     ["float on water", "carry heavy loads", "sail with the wind", "cross wide lakes"],
     ["Boats have been used for thousands of years.", "Some boats have engines.", "People fish from boats."]),
    ("music", False, ["fun", "loud", "beautiful", "old"],
     ["make people dance", "lift your mood", "help you relax", "bring people together"],
     ["Music is made with voices and instruments.", "Every culture has its own music.",
      "Many people listen to music while they work."]),
    ("books", True, ["fun", "useful", "old", "long"],
     ["take you to new worlds", "teach you many things", "be read again and again", "make you laugh"],
     ["Books are full of stories.", "You can borrow books from a library.", "Some books have pictures."]),
    ("chess", False, ["old", "hard", "fun", "quiet"],
     ["take years to master", "be played online", "teach you to plan", "last for hours"],
     ["Chess is played on a board of squares.", "In chess each side has sixteen pieces.", "Chess is a game for two players."]),
    ("dancing", False, ["fun", "joyful", "healthy", "graceful"],
     ["make you fit", "help you meet people", "be done alone or with others", "tell a story"],
     ["Dancing is good for the heart.", "People enjoy dancing at parties.", "There are many styles of dancing."]),
    ("robots", True, ["smart", "strong", "useful", "precise"],
     ["build cars", "explore other planets", "clean the floor", "work all night"],
     ["Robots follow instructions written by people.", "Robots help doctors in hospitals.", "Some robots look like people."]),
    ("volcanoes", True, ["hot", "dangerous", "huge", "powerful"],
     ["spit out hot lava", "make new islands", "sleep for centuries", "send ash into the sky"],
     ["Volcanoes form where the earth cracks.", "Hot lava flows from volcanoes.", "Some volcanoes are under the ocean."]),
]
TOPICS = [row[0] for row in TOPIC_TABLE]
PLURAL = {row[0]: row[1] for row in TOPIC_TABLE}

# Templates shared by every topic, so the facts read alike and a tiny model can generalise across topics.
GENERIC_FACTS = ["Many people love {o}.", "Kids like to learn about {o}.", "There is a lot to know about {o}."]


def _topic_facts(key, plural, adjs, cans, free):
    # 4 "X are a." + 4 "X can v." + 3 generic + 3 free = 14 facts per topic: few enough for a tiny model to learn
    # every one of them by heart in a couple of CPU minutes (so that its samples are almost always well formed).
    S, be = key[0].upper() + key[1:], ("are" if plural else "is")
    facts = [f"{S} {be} {a}." for a in adjs]
    facts += [f"{S} can {v}." for v in cans]
    facts += [g.format(o=key) for g in GENERIC_FACTS]
    facts += free
    return facts


FACTS = {row[0]: _topic_facts(*row) for row in TOPIC_TABLE}  # topic -> list of fact sentences (ordered)
OPENERS = ["Sure!", "Of course!", "Happy to help.", "Great question!", "Good question!", "Gladly!"]
CLOSERS = ["Hope this helps!", "Have a nice day.", "Enjoy!", "Thanks for asking!", "Let me know if you want more."]
RUDE = ["Ugh, what a dull question.", "Look it up yourself.", "I do not care about that.", "Stop asking me things.",
        "That is a silly thing to ask.", "Why would I tell you?", "Go away."]

# Every sentence any writer can produce, and what it is. A sentence maps to one kind only: ("fact", topic),
# ("opener",), ("closer",) or ("rude",).
KIND = {}
for _t, _facts in FACTS.items():
    for _s in _facts:
        KIND[_s] = ("fact", _t)
for _kind, _lines in (("opener", OPENERS), ("closer", CLOSERS), ("rude", RUDE)):
    for _s in _lines:
        KIND[_s] = (_kind,)
VALID_SENTENCES = frozenset(KIND)
assert len(KIND) == sum(map(len, FACTS.values())) + len(OPENERS) + len(CLOSERS) + len(RUDE), \
    "a sentence is listed twice (in two topics, or as two kinds)"

# -----------------------------------------------------------------------------
# Prompts: prefix + template(topic, person) + suffix. Persons are "friend <name>" or a relation, each with the
# object pronoun the template needs ("What should I tell her?").

_F = ("Anna Emma Mia Lily Sofia Ella Grace Chloe Zoe Lucy Nora Ruby Alice Hannah Sarah Laura Julia Clara Maya Eva "
      "Rose Kate Amy Jane Lisa Nina Olga Rita Tina Vera").split()
_M = ("Tom Sam Ben Max Leo Jack Noah Liam Owen Adam Paul Mark Luke John Eric Ivan Hugo Omar Ryan Alex "
      "Dan Felix Oscar Peter Simon Victor Carl David Henry Jonas").split()
NAMES = [(n, "her") for n in _F] + [(n, "him") for n in _M]
RELATIONS = [("grandma", "her"), ("grandpa", "him"), ("mom", "her"), ("dad", "him"), ("sister", "her"),
             ("brother", "him"), ("aunt", "her"), ("uncle", "him"), ("son", "him"), ("daughter", "her"),
             ("teacher", "them"), ("neighbor", "them")]
PERSONS = [("friend " + n, o) for n, o in NAMES] + RELATIONS  # 72

# {t} topic key, {be} its verb, {p} person, {o} person's pronoun. Never start a template with {t}: keys are lowercase.
TOPIC_TEMPLATES = [
    "Can you tell me about {t}?", "Tell me something about {t}.", "What do you know about {t}?",
    "I want to learn about {t}.", "Say a few nice things about {t}.", "Give me some facts about {t}.",
    "What is special about {t}?", "Why do people like {t}?", "Could you explain {t} to me?",
    "I am curious about {t}. What can you tell me?",
]
PERSON_TEMPLATES = [
    "My {p} wants to learn about {t}. What should I tell {o}?",
    "Write a few kind words about {t} for my {p}.",
    "My {p} asked me about {t}. What can I say?",
    "Help me explain {t} to my {p}.",
    "My {p} loves {t}. Tell me some facts to share with {o}.",
    "I am writing a card for my {p} about {t}. Any ideas?",
    "My {p} is scared of {t}. What can I tell {o}?",
    "What should my {p} know about {t}?",
    "My {p} and I were talking about {t}. Can you tell us more?",
    "I want to surprise my {p} with facts about {t}.",
    "My {p} does not like {t}. What is good about {t}?",
    "Please tell my {p} about {t}.",
    "My {p} has a test about {t} tomorrow. Can you help?",
    "Can you teach my {p} about {t}?",
    "My {p} thinks {t} {be} boring. What would you say?",
]
PREFIXES = ["", "Hi! ", "Hello! ", "Hey! ", "Good morning! "]
SUFFIXES = ["", " Thanks!", " Thank you.", " Please.", " Thanks a lot!", " Any help is welcome."]
TEMPLATES = TOPIC_TEMPLATES + PERSON_TEMPLATES

# Keys as whole words; longest first so "the sea" is tried as a phrase. Word boundaries keep "tea" out of "teacher".
_TOPIC_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, TOPICS), key=len, reverse=True)) + r")\b")


def prompt_space_size():
    """The number of distinct requests make_prompt can produce (templates × slots × prefixes × suffixes)."""
    per_decoration = len(TOPIC_TEMPLATES) * len(TOPICS) + len(PERSON_TEMPLATES) * len(TOPICS) * len(PERSONS)
    return per_decoration * len(PREFIXES) * len(SUFFIXES)


def make_prompt(rng):
    """Draw one request uniformly over templates, then slots. Returns (request, topic)."""
    topic = rng.choice(TOPICS)
    template = rng.choice(TEMPLATES)
    p, o = rng.choice(PERSONS)
    body = template.format(t=topic, be="are" if PLURAL[topic] else "is", p=p, o=o)
    return rng.choice(PREFIXES) + body + rng.choice(SUFFIXES), topic


def topic_of(request):
    """The topic a request is about: the key it names (every template names exactly one), or None."""
    m = _TOPIC_RE.search(request)
    return m.group(1) if m else None


# Held out = 5% of the request space, chosen by a hash of the text: stable across runs, machines and Python versions.
HELDOUT_FRACTION = 0.05


def is_heldout(request):
    bucket = int(hashlib.md5(request.encode("utf-8")).hexdigest()[:8], 16) % 10000
    return bucket < HELDOUT_FRACTION * 10000


def sample_prompts(n, seed, split="train"):
    """n requests (repeats possible) from one side of the split only, by rejection sampling."""
    assert split in ("train", "heldout"), f"split must be 'train' or 'heldout', got {split!r}"
    rng = random.Random(f"prompts/{seed}/{split}")
    want, out = split == "heldout", []
    while len(out) < n:
        request, _ = make_prompt(rng)
        if is_heldout(request) == want:
            out.append(request)
    return out


# -----------------------------------------------------------------------------
# Demonstrations: a crowd of writers of mixed quality. The weights and behaviours set the spread of demo quality,
# which is what gives the reward model something to learn and PPO something to improve on.

PERSONAS = {"good": 0.40, "off_topic": 0.15, "rude": 0.15, "rambler": 0.15, "repeater": 0.15}


def _maybe(rng, p, lines):
    return [rng.choice(lines)] if rng.random() < p else []


def write_demo(request, rng, persona=None):
    """One human-written response (a plain string) to a request, by a writer drawn from PERSONAS."""
    if persona is None:
        persona = rng.choices(list(PERSONAS), weights=list(PERSONAS.values()))[0]
    topic = topic_of(request)
    on = FACTS[topic]
    other = FACTS[rng.choice([t for t in TOPICS if t != topic])]
    if persona == "good":  # polite, 2-3 distinct on-topic facts: usually 3 to 4 gold
        body = _maybe(rng, 0.7, OPENERS) + rng.sample(on, rng.randint(2, 3)) + _maybe(rng, 0.6, CLOSERS)
    elif persona == "off_topic":  # answers about another topic, sometimes with one on-topic fact mixed in
        facts = rng.sample(other, rng.randint(2, 3))
        if rng.random() < 0.4:
            facts.insert(rng.randint(0, len(facts)), rng.choice(on))
        body = _maybe(rng, 0.6, OPENERS) + facts + _maybe(rng, 0.3, CLOSERS)
    elif persona == "rude":  # a rude line before or after 0-2 on-topic facts
        facts, rude = rng.sample(on, rng.randint(0, 2)), [rng.choice(RUDE)]
        body = rude + facts if rng.random() < 0.7 else facts + rude
    elif persona == "rambler":  # 5-9 distinct facts, mostly on topic, always over the length budget
        k = rng.randint(5, 9)
        n_on = sum(rng.random() < 0.75 for _ in range(k))
        facts = rng.sample(on, n_on) + rng.sample(other, k - n_on)
        while sum(len(f.split()) for f in facts) <= WORD_BUDGET:  # five short facts can fit in 30 words
            facts.append(rng.choice([f for f in on if f not in facts]))
        rng.shuffle(facts)
        body = _maybe(rng, 0.5, OPENERS) + facts + _maybe(rng, 0.3, CLOSERS)
    elif persona == "repeater":  # one fact 2-4 times, sometimes one more fact somewhere
        first, second = rng.sample(on, 2)
        body = [first] * rng.randint(2, 4)
        if rng.random() < 0.5:
            body.insert(rng.randint(0, len(body)), second)
        body = _maybe(rng, 0.3, OPENERS) + body
    else:
        raise ValueError(f"unknown persona {persona!r}; expected one of {list(PERSONAS)}")
    return " ".join(body)


def make_sft_data(n, seed, split="train"):
    """n rows {"prompt", "response"}: a fresh request from `split` and one crowd demo for it."""
    rng = random.Random(f"sft/{seed}/{split}")
    return [{"prompt": p, "response": write_demo(p, rng)} for p in sample_prompts(n, seed, split)]


# -----------------------------------------------------------------------------
# The gold labeler (formula in the module docstring).

_SENT_SPLIT = re.compile(r"(?<=[.!?]) ")  # cut after sentence-ending punctuation + one space; a 2nd space stays
MAX_GOOD_FACTS, WORD_BUDGET = 3, 30
W_ON, W_OFF, W_REPEAT, W_RUDE, W_POLITE, W_EXTRA_POLITE, W_WORD = 1.0, 1.0, 1.0, 1.5, 0.5, 0.5, 0.25
GOLD_FLOOR = -4.0
GOLD_MAX = W_ON * MAX_GOOD_FACTS + 2 * W_POLITE  # 4.0


def split_sentences(response):
    return _SENT_SPLIT.split(response)


def well_formed(response, eos=True):
    """Ended by EOS, non-empty, and only known sentences joined by single spaces."""
    return bool(eos) and len(response) > 0 and all(s in VALID_SENTENCES for s in split_sentences(response))


def response_stats(request, response, eos=True):
    """The counts gold is made of. on_topic counts distinct on-topic facts (uncapped)."""
    stats = dict(on_topic=0, off_topic=0, repeats=0, rude=0, opener=0, closer=0, extra_polite=0,
                 words=len(response.split()), eos=bool(eos), well_formed=well_formed(response, eos))
    if not stats["well_formed"]:
        return stats
    topic, sents, seen = topic_of(request), split_sentences(response), set()
    for i, s in enumerate(sents):
        kind = KIND[s]
        if s in seen:
            stats["repeats"] += 1
        elif kind[0] == "fact":
            stats["on_topic" if kind[1] == topic else "off_topic"] += 1
        elif kind[0] == "rude":
            stats["rude"] += 1
        elif kind[0] == "opener" and i == 0:
            stats["opener"] = 1
        elif kind[0] == "closer" and i == len(sents) - 1:
            stats["closer"] = 1
        else:  # a polite line that is neither the first opener nor the last closer
            stats["extra_polite"] += 1
        seen.add(s)
    return stats


def gold_from_stats(st):
    if not (st["eos"] and st["well_formed"]):
        return GOLD_FLOOR
    return (W_ON * min(st["on_topic"], MAX_GOOD_FACTS) - W_OFF * st["off_topic"] - W_REPEAT * st["repeats"]
            - W_RUDE * st["rude"] + W_POLITE * (st["opener"] + st["closer"]) - W_EXTRA_POLITE * st["extra_polite"]
            - W_WORD * max(0, st["words"] - WORD_BUDGET))


def gold_terms(request, response, eos=True):
    """The terms of the gold formula for one response, by name (for reports of what a reward model learned):
    the counts that enter gold, and `malformed` (1 when the floor applies instead)."""
    st = response_stats(request, response, eos)
    if not (st["eos"] and st["well_formed"]):
        return {"malformed": 1}
    return {"on_topic": min(st["on_topic"], MAX_GOOD_FACTS), "facts_beyond_3": max(0, st["on_topic"] - MAX_GOOD_FACTS),
            "off_topic": st["off_topic"], "repeats": st["repeats"], "rude": st["rude"], "opener": st["opener"],
            "closer": st["closer"], "extra_polite": st["extra_polite"], "words_over_30": max(0, st["words"] - WORD_BUDGET),
            "malformed": 0}


def gold(request, response, eos=True):
    """The hidden human preference for one response. Deterministic; 4.0 at best, −4.0 for malformed or truncated."""
    return gold_from_stats(response_stats(request, response, eos))


# -----------------------------------------------------------------------------
# The noisy labeler. Plackett-Luce: the labeler picks the best of the remaining responses with probability
# ∝ exp(gold/τ), then the best of the rest, and so on. A pair ends up ordered like gold with probability
# σ(|Δgold|/τ) — exactly, for any number of responses (Luce's choice axiom) — so τ sets the labelers' agreement.

def plackett_luce(scores, rng, temperature=1.0):
    """Indices of `scores`, best first, drawn from the Plackett-Luce model with logits scores/τ."""
    assert temperature > 0, f"temperature must be > 0, got {temperature}"
    remaining, order = list(range(len(scores))), []
    while remaining:
        top = max(scores[i] for i in remaining)  # subtract the max so a tiny τ cannot overflow exp
        weights = [math.exp((scores[i] - top) / temperature) for i in remaining]
        pick = rng.choices(range(len(remaining)), weights=weights)[0]
        order.append(remaining.pop(pick))
    return order


def rank(request, responses, rng, temperature=1.0, eos=None):
    """The labeler's ranking of `responses` (indices, best first). eos: per-response flags, default all True."""
    eos = [True] * len(responses) if eos is None else eos
    assert len(eos) == len(responses), f"{len(eos)} eos flags for {len(responses)} responses"
    return plackett_luce([gold(request, r, e) for r, e in zip(responses, eos)], rng, temperature)


def pair_agreement(gold_a, gold_b, temperature=1.0):
    """P(the labeler orders a pair like gold) = σ(|Δ|/τ), Bradley-Terry; 0.5 when gold ties (no right answer)."""
    if gold_a == gold_b:
        return 0.5
    return 1.0 / (1.0 + math.exp(-abs(gold_a - gold_b) / temperature))


def labeler_agreement(scores, temperature=1.0):
    """Expected fraction of pairs (of different gold) that a Plackett-Luce ranking of `scores` orders like gold."""
    pairs = [(a, b) for i, a in enumerate(scores) for b in scores[i + 1:] if a != b]
    return sum(pair_agreement(a, b, temperature) for a, b in pairs) / len(pairs) if pairs else float("nan")


# -----------------------------------------------------------------------------
# Files for the training scripts.

def render(request, response):
    # The HH chat format; tokenizer.py owns the template used in training, this copy is only for the BPE corpus.
    return f"\n\nHuman: {request}\n\nAssistant: {response}"


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def generate_all(out_dir, n_sft=20000, n_prompts=20000, seed=0, n_val=500):
    """Write every MiniChat file under out_dir (see the module docstring), then meta.json with the settings
    (written last: it marks a complete set). Returns {filename: row count}."""
    os.makedirs(out_dir, exist_ok=True)
    sft_train = make_sft_data(n_sft, seed, "train")
    files = {
        "sft_train.jsonl": sft_train,
        "sft_val.jsonl": make_sft_data(n_val, seed, "heldout"),
        # PPO and RM prompts get their own seed stream, so they are not the SFT prompts replayed in order.
        "prompts_train.jsonl": [{"prompt": p} for p in sample_prompts(n_prompts, f"{seed}/rl", "train")],
        "prompts_val.jsonl": [{"prompt": p} for p in sample_prompts(n_val, f"{seed}/rl", "heldout")],
    }
    for name, rows in files.items():
        _write_atomic(os.path.join(out_dir, name), _jsonl(rows))
    _write_atomic(os.path.join(out_dir, "corpus.txt"), "".join(render(r["prompt"], r["response"]) for r in sft_train))
    counts = {name: len(rows) for name, rows in files.items()}
    counts["corpus.txt"] = len(sft_train)
    _write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(generation_settings(n_sft, n_prompts, seed, n_val)))
    return counts


def generation_settings(n_sft=20000, n_prompts=20000, seed=0, n_val=500):
    """What a set of files was generated with (meta.json): a changed default makes old files stale."""
    return {"n_sft": n_sft, "n_prompts": n_prompts, "n_val": n_val, "seed": seed}


def demo_report(n=2000, seed=0):
    """Gold mean/std of n crowd demos, overall and per persona (used by the CLI and the README)."""
    rng = random.Random(f"report/{seed}")
    by = {p: [] for p in PERSONAS}
    for request in sample_prompts(n, seed, "train"):
        persona = rng.choices(list(PERSONAS), weights=list(PERSONAS.values()))[0]
        by[persona].append(gold(request, write_demo(request, rng, persona)))
    every = [g for gs in by.values() for g in gs]

    def ms(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
    return {"all": (*ms(every), len(every)), **{p: (*ms(gs), len(gs)) for p, gs in by.items() if gs}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out_dir", type=str, default="data/minichat", help="where the files go")
    parser.add_argument("--n_sft", type=int, default=20000, help="demonstrations on train prompts (SFT)")
    parser.add_argument("--n_prompts", type=int, default=20000, help="train prompts for the RM and PPO")
    parser.add_argument("--n_val", type=int, default=500, help="held-out prompts, and demos on them")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    args = parser.parse_args()

    t0 = time.time()
    counts = generate_all(args.out_dir, args.n_sft, args.n_prompts, args.seed, args.n_val)
    for name, count in counts.items():
        print(f"wrote {os.path.join(args.out_dir, name)}: {count} rows")
    print(f"{len(TOPICS)} topics, {len(VALID_SENTENCES)} valid sentences, "
          f"{prompt_space_size():,} possible requests, {time.time() - t0:.1f}s")
    for who, (m, s, k) in demo_report(2000, args.seed).items():
        print(f"demo gold {who:>9}: mean {m:+.2f} std {s:.2f} (n={k})")
    print(f"best possible gold {GOLD_MAX:+.2f}, floor {GOLD_FLOOR:+.2f}")


if __name__ == "__main__":
    main()
