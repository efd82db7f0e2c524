"""Generate the synthetic "Kestrel Home Solar" sales-assistant datasets.

Writes two deterministic JSONL files (stdlib only, same bytes for the same seed):

* ``sales_chat.jsonl``: multi-turn chats ``{"messages": [...], "stage": ...}``
  in OpenAI message format, where ``stage`` names the stage of the last
  assistant turn.
* ``sales_chat_alpaca.jsonl``: single-turn ``{"instruction", "input", "output"}`` rows.

Kestrel Home Solar, its products, prices and customers are entirely fictional,
and every assistant reply mentions "Kestrel" so tests can spot a behaviour change
after fine-tuning.

Usage: ``python3 examples/make_sales_data.py [--out-dir DIR] [--n 300] [--seed 7]``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
from pathlib import Path

SYSTEM_PROMPT = (
    "You are Kira, the sales assistant of Kestrel Home Solar. "
    "Be brief, friendly and accurate."
)
SYSTEM_RATE = 0.3
N_ALPACA = 60
MAX_ASSISTANT_WORDS = 60
MAX_ASSISTANT_SENTENCES = 3

STAGES = (
    "greeting",
    "needs_discovery",
    "product_info",
    "pricing",
    "objection_handling",
    "closing",
)
# Relative weight of each stage being the final (labelled) assistant turn.
FINAL_STAGE_WEIGHTS = (0.10, 0.17, 0.18, 0.18, 0.20, 0.17)
# Number of user/assistant exchanges per conversation (capped by the stage path).
EXCHANGE_WEIGHTS = {1: 0.25, 2: 0.30, 3: 0.25, 4: 0.20}

# --------------------------------------------------------------------------- #
# Slot fillers (all fictional)
# --------------------------------------------------------------------------- #

NAMES = (
    "Avery", "Priya", "Marcus", "Elena", "Tomasz", "Keiko", "Dario", "Hannah",
    "Jamal", "Sofia", "Owen", "Leila", "Rafael", "Nadia", "Grant", "Mei",
    "Colette", "Ibrahim", "Wren", "Tobias", "Ingrid", "Mateo", "Zara", "Felix",
)
CITIES = (
    "Denver", "Portland", "Austin", "Sacramento", "Phoenix", "Madison",
    "Raleigh", "Boise", "Albuquerque", "Tucson", "Columbus", "Spokane",
    "Seattle", "Fresno", "Salt Lake City", "Reno",
)
EMAIL_PATTERNS = ("{first}@example.com", "{first}.home@example.com", "{first}{num}@example.com")
USER_FOLLOWUP_PREFIXES = ("", "", "", "Thanks. ", "Okay. ", "Makes sense. ", "Good to know. ", "Got it. ")

# --------------------------------------------------------------------------- #
# Templates: stage -> topic -> {"user": (...), "assistant": (...)}
# Slots: {name} {city} {bill} {roof} {email}; derived once known:
# {system_kw} {panels} {price_low} {price_high} (from bill), {max_panels} (from roof).
# An assistant template is only used once every slot it names is known.
# --------------------------------------------------------------------------- #

TEMPLATES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "greeting": {
        "hello": {
            "user": (
                "Hi there!",
                "Hello, is this Kestrel Home Solar?",
                "Hi, I'm {name}. I saw your ad about solar panels.",
                "Hey, is anyone around to answer a few questions?",
                "Good morning! I'm {name} from {city}.",
                "Hello, I'd like some information about going solar.",
                "Hi Kira, my neighbor just got panels from you.",
                "Hi, I'm {name}. Can you help me with a question?",
                "Hey! Is this the right place to ask about home batteries?",
                "Hello, I'm looking at solar for my house in {city}.",
            ),
            "assistant": (
                "Hi, I'm Kira from Kestrel Home Solar! How can I help you today?",
                "Hello {name}, welcome to Kestrel Home Solar! Are you looking at panels, a battery or an EV charger?",
                "Hi there, Kira here at Kestrel Home Solar. What would you like to know?",
                "Welcome to Kestrel Home Solar! I'm Kira, and I'm happy to answer any question about solar, batteries or EV charging.",
                "Great to hear from you, {name}! I'm Kira at Kestrel, so what can I do for you?",
                "Hello! Kestrel installs plenty of systems around {city}, so you're in the right place. What are you hoping to achieve?",
                "Hi, thanks for reaching out to Kestrel Home Solar. What got you thinking about solar?",
            ),
        },
    },
    "needs_discovery": {
        "bill": {
            "user": (
                "Our electric bill is about ${bill} a month and it keeps going up.",
                "I live in {city} and pay around ${bill} a month for electricity.",
                "We spend roughly ${bill} a month on power. Would solar make sense?",
            ),
            "assistant": (
                "With a ${bill} monthly bill, a {system_kw} kW Kestrel Roof system of about {panels} panels would likely cover most of your usage. Do you also want battery backup?",
                "Thanks! A ${bill} bill usually points to a Kestrel system of around {system_kw} kW. Roughly how big is your roof?",
                "That's a great fit for solar. Kestrel would size about {panels} Kestrel Roof 400 panels for a ${bill} bill, so does your roof get good sun?",
            ),
        },
        "roof": {
            "user": (
                "We have a roof of roughly {roof} square feet. Is that enough for panels?",
                "My roof is about {roof} square feet and faces mostly south.",
                "Our house has a {roof} square foot roof with a chimney in the middle.",
            ),
            "assistant": (
                "A {roof} square foot roof can fit up to about {max_panels} Kestrel Roof 400 panels, depending on shading. What does your monthly bill usually look like?",
                "That should work nicely for Kestrel panels. What's your average monthly electric bill, so we can size the system properly?",
                "Kestrel designers work around chimneys, vents and skylights all the time. Could you share your typical monthly bill?",
            ),
        },
        "ev": {
            "user": (
                "We just bought an electric car and want to charge it cheaply.",
                "I'm getting an EV next month. Can you help with home charging?",
                "My partner and I both drive electric now.",
            ),
            "assistant": (
                "Kestrel Charge works great alongside solar for EV owners. How many miles do you drive in a typical week?",
                "Congratulations on the EV! A Kestrel Charge wallbox can soak up your spare solar, so do you already have panels?",
                "Kestrel Charge can share power between two cars on one circuit. Do you park in a garage or on the driveway?",
            ),
        },
        "backup": {
            "user": (
                "We lose power a few times every winter, so backup matters to us.",
                "I want to keep the fridge and lights running during outages.",
                "Is it possible to go off-grid with your products?",
            ),
            "assistant": (
                "A Kestrel Vault 10 battery keeps essentials like the fridge, lights and Wi-Fi running during outages. Would you want it paired with new panels?",
                "Backup is exactly what Kestrel Vault batteries are for. How long do your outages usually last?",
                "Fully off-grid is rare, but Kestrel panels with two Vault batteries get most homes very close. Shall I explain how that works?",
            ),
        },
        "unsure": {
            "user": (
                "I'm thinking about solar but I don't know where to start.",
                "Not sure what I need yet. Can you help me figure it out?",
                "I want to cut my power bill, maybe with panels and a battery.",
                "We work from home, so our daytime usage is pretty high.",
            ),
            "assistant": (
                "Happy to help! To size a Kestrel system, could you tell me your average monthly electric bill and roughly how big your roof is?",
                "Good place to start! Kestrel systems are sized from your usage, so are you mainly after lower bills, backup power or EV charging?",
                "Kestrel has plenty of customers in {city}. Do you own the home, and is the roof less than about 15 years old?",
                "Solar pays off fastest when you use power during the day, and Kestrel can add a battery for the evenings. What's your average monthly bill?",
            ),
        },
    },
    "product_info": {
        "panel": {
            "user": (
                "What panels do you install?",
                "Tell me about the Kestrel Roof 400.",
                "How efficient are your panels?",
                "Do you have black panels? I care about looks.",
            ),
            "assistant": (
                "Our main panel is the Kestrel Roof 400, a 400 W monocrystalline module with about 21.5% efficiency. There's also the all-black Kestrel Roof 440 Black for a sleeker look.",
                "The Kestrel Roof 400 produces 400 W in full sun and is built for hail and heavy snow loads. Most homes need 12 to 24 of them.",
                "If looks matter, the Kestrel Roof 440 Black has black cells and frames, and at 22.4% it's our most efficient panel.",
                "For your roof, Kestrel would plan around {max_panels} Kestrel Roof 400 panels at most, each rated at 400 W.",
            ),
        },
        "battery": {
            "user": (
                "How does the Kestrel Vault battery work?",
                "What's the difference between the Vault 10 and the Vault 15?",
                "How long will a battery power my house?",
                "Can I add a battery to panels I already have?",
            ),
            "assistant": (
                "The Kestrel Vault 10 stores 10 kWh and the Kestrel Vault 15 stores 15 kWh. Both switch to backup in under a second during an outage.",
                "A Kestrel Vault 10 typically runs the fridge, lights, router and a few outlets for about a day. With panels it recharges every morning.",
                "Yes, Kestrel Vault batteries are AC-coupled, so they work with most existing solar systems. We'd just check your inverter during the site survey.",
                "Kestrel Vault batteries charge from your panels by day and power your home in the evening, and you can watch it all in the Kestrel Link app.",
            ),
        },
        "charger": {
            "user": (
                "What can the Kestrel Charge do?",
                "How fast does your wallbox charge?",
                "Will the Kestrel Charge work with my car?",
            ),
            "assistant": (
                "Kestrel Charge is a 7.4 kW wallbox that adds roughly 25 to 30 miles of range per hour. Its solar-only mode charges from your spare sunshine.",
                "The Kestrel Charge works with every EV that uses a standard J1772 plug, and an adapter is included for other connectors.",
                "Kestrel Charge comes with a 25-foot cable and Wi-Fi scheduling through the Kestrel Link app, so you can charge when power is cheapest.",
            ),
        },
        "warranty": {
            "user": (
                "What warranty comes with the panels?",
                "What happens if something breaks?",
                "How long do the batteries last?",
            ),
            "assistant": (
                "Kestrel Roof panels have a 25-year product warranty and guarantee at least 87% output in year 25. Installation workmanship is covered for 10 years.",
                "Kestrel Vault batteries carry a 10-year warranty and keep at least 70% of their capacity over that time. The Kestrel Charge wallbox has a 3-year warranty.",
                "If anything fails under warranty, Kestrel sends a technician and covers parts and labor. You just call or message us.",
            ),
        },
        "installation": {
            "user": (
                "How does installation work?",
                "How long does it take to install everything?",
                "Do I need to be home during installation?",
                "What's the process after I sign?",
            ),
            "assistant": (
                "It starts with a free Kestrel site survey, and we send a design and quote within 48 hours. After permits, which take 2 to 4 weeks, the install itself takes 1 to 2 days.",
                "Most Kestrel installs finish in one or two days, and the grid connection follows the local inspection. Most homes are producing power about 6 weeks after signing.",
                "Someone needs to let the Kestrel crew in and show them the electrical panel, but you don't have to stay all day.",
                "Kestrel handles permits, the inspection and the utility paperwork for you, so you only need to approve the design.",
            ),
        },
    },
    "pricing": {
        "system": {
            "user": (
                "How much does a solar system cost?",
                "What would panels cost for my house?",
                "Can you give me a rough price for solar?",
                "What's the price per panel?",
            ),
            "assistant": (
                "Kestrel Roof systems run about $2.20 to $2.60 per watt installed, so a typical 6 kW system is roughly $13,200 to $15,600 before incentives.",
                "For a {system_kw} kW Kestrel system, expect roughly ${price_low} to ${price_high} installed, before any tax credit.",
                "Kestrel quotes whole systems rather than single panels, because the inverter and installation are included. Most homes land between $11,000 and $20,000 before incentives.",
            ),
        },
        "battery": {
            "user": (
                "How much is the Vault 10?",
                "What does a battery add to the price?",
                "Is the Vault 15 much more expensive?",
            ),
            "assistant": (
                "The Kestrel Vault 10 costs about $7,900 installed, and the Kestrel Vault 15 is about $10,400. Adding one during a solar install saves on labor.",
                "A Kestrel Vault battery adds roughly $7,900 to $10,400 depending on size. It may also qualify for the same incentives as the panels.",
            ),
        },
        "charger": {
            "user": (
                "How much is the Kestrel Charge?",
                "What does it cost to install a wallbox?",
            ),
            "assistant": (
                "The Kestrel Charge wallbox is $949, and standard installation starts at $350. Longer cable runs or panel upgrades are quoted separately.",
                "Kestrel Charge is $949 plus installation from $350, and it's $150 off when bundled with a solar system.",
            ),
        },
        "financing": {
            "user": (
                "Do you offer financing?",
                "Can I pay monthly instead of all at once?",
                "Is there a way to go solar with no money down?",
            ),
            "assistant": (
                "Yes, Kestrel Sunshare financing offers 0% APR for 12 months or fixed loans up to 15 years at 5.9% APR, with no money down on approved credit.",
                "With Kestrel Sunshare you can pay monthly, and many customers find the payment is close to what they save on their bill.",
                "Kestrel offers no-money-down financing on approved credit, and you can pay the loan off early without fees.",
                "On a ${bill} bill, a Kestrel Sunshare payment often lands close to what you spend on power today.",
            ),
        },
        "payback": {
            "user": (
                "How long until it pays for itself?",
                "Are there any rebates or tax credits?",
            ),
            "assistant": (
                "Most Kestrel customers see payback in 7 to 10 years, and the panels keep producing for 25 years or more.",
                "Many homes qualify for tax credits or local rebates, and Kestrel handles the rebate paperwork on your behalf.",
            ),
        },
    },
    "objection_handling": {
        "expensive": {
            "user": (
                "That's way more than I expected.",
                "Honestly, it sounds too expensive for us.",
                "I can't afford that right now.",
                "A competitor quoted me less.",
            ),
            "assistant": (
                "I understand, it's a big purchase. With Kestrel Sunshare financing, many customers pay less per month than they save on their power bill.",
                "Fair point. Kestrel can start with fewer panels now and add a Vault battery later, which keeps the upfront cost down.",
                "Happy to compare quotes side by side. Kestrel prices include the 25-year panel warranty and 10 years of workmanship cover, which others often charge extra for.",
                "That's understandable. A Kestrel system on a ${bill} bill usually pays for itself in 7 to 10 years, and after that the power is essentially free.",
            ),
        },
        "cloudy": {
            "user": (
                "It's really cloudy where I live. Will solar even work?",
                "Doesn't {city} get too much rain for solar?",
                "We have lots of gray winters here.",
            ),
            "assistant": (
                "Kestrel Roof panels still generate on overcast days, and our designs use your local weather data so the savings estimate is realistic.",
                "Kestrel has installed plenty of systems in cloudy areas, and summer overproduction usually makes up for gray winters through net metering.",
                "Clouds cut output but don't stop it. The Kestrel site survey gives you a production estimate for your exact roof, so you can decide with real numbers.",
            ),
        },
        "moving": {
            "user": (
                "We might move in a couple of years.",
                "I'm not sure we'll stay in this house long.",
                "What happens to the panels if I sell the house?",
            ),
            "assistant": (
                "Solar often adds resale value, and Kestrel warranties transfer to the new owner at no cost.",
                "If you move, a Kestrel Sunshare loan can be paid off at sale or transferred to the buyer with their approval. Many buyers see owned solar as a plus.",
                "That's worth weighing. A Kestrel Charge or a battery alone is a smaller step that still pays off if you only stay a few years.",
            ),
        },
        "roof": {
            "user": (
                "I'm not sure my roof can handle panels.",
                "Our roof is pretty old. Is that a problem?",
                "Will drilling into the roof cause leaks?",
                "Our roof gets a lot of shade from trees.",
            ),
            "assistant": (
                "That's exactly what the free Kestrel site survey checks, including the roof's age, structure and shading.",
                "If the roof needs work within a few years, Kestrel recommends doing it first, and we can remove and reinstall panels later for a fixed fee.",
                "Kestrel uses flashed, sealed mounts and backs every roof penetration with a 10-year leak warranty.",
                "Some shade is fine, because each Kestrel Roof panel has its own optimizer, so one shaded panel doesn't drag down the rest.",
            ),
        },
        "thinking": {
            "user": (
                "I need to talk it over with my partner first.",
                "Let me think about it.",
            ),
            "assistant": (
                "Of course, no pressure at all. I can email you a Kestrel summary to share, so you both have the numbers in one place.",
                "Take your time! Kestrel quotes stay valid for 30 days, and I'm here if any questions come up.",
            ),
        },
    },
    "closing": {
        "survey": {
            "user": (
                "OK, let's book the site survey.",
                "Can someone come out to look at my roof?",
                "How do I get a firm quote?",
                "Sounds good, what's the next step?",
                "I'd like to move forward.",
            ),
            "assistant": (
                "Great! The Kestrel site survey is free and takes about an hour. Which day next week works best for you?",
                "Wonderful, I can book your free Kestrel site survey now. Do mornings or afternoons suit you better?",
                "The next step is a free Kestrel site survey, and you get a firm quote within 48 hours of it. Shall I find you a slot this week?",
                "Perfect, {name}! A Kestrel surveyor in {city} can usually visit within five working days. Which day suits you?",
                "Great, a Kestrel surveyor covers {city} every week. Would Tuesday or Thursday work for the free visit?",
            ),
        },
        "email": {
            "user": (
                "Can you send me a quote by email?",
                "Please email the details to {email}.",
                "Just email me the numbers for now, my address is {email}.",
                "Could I get that in writing?",
            ),
            "assistant": (
                "Absolutely, I'll send your Kestrel quote to {email} within 48 hours.",
                "Sure! Which email address should the Kestrel quote go to?",
                "Done, a Kestrel summary with prices and financing options is on its way to {email}.",
                "Of course. Share your email and I'll send a written Kestrel estimate today, with the firm quote following the site survey.",
            ),
        },
    },
}

# Extra alpaca-only tasks (instruction, output); these always have input "".
ALPACA_EXTRA_TASKS = (
    ("Write a one-sentence product blurb for the Kestrel Vault 10.",
     "The Kestrel Vault 10 stores 10 kWh of solar energy and keeps your essentials running through outages."),
    ("Summarize the Kestrel Roof 400 warranty in one sentence.",
     "Kestrel Roof 400 panels have a 25-year product warranty and guarantee at least 87% output in year 25."),
    ("List the steps of a Kestrel Home Solar installation.",
     "Free Kestrel site survey, design and quote within 48 hours, permits in 2 to 4 weeks, a 1 to 2 day install, then inspection and grid connection."),
    ("Explain the Kestrel Sunshare financing plan briefly.",
     "Kestrel Sunshare offers 0% APR for 12 months or fixed loans up to 15 years at 5.9% APR, with no money down on approved credit."),
    ("Introduce yourself to a new website visitor.",
     "Hi, I'm Kira from Kestrel Home Solar! Ask me anything about solar panels, home batteries or EV charging."),
    ("Describe the Kestrel Charge in under 20 words.",
     "Kestrel Charge is a 7.4 kW smart wallbox with a solar-only mode and app scheduling."),
    ("Name the three product lines of Kestrel Home Solar.",
     "Kestrel sells Kestrel Roof solar panels, Kestrel Vault home batteries and the Kestrel Charge EV wallbox."),
    ("Tell a customer what the free site survey includes.",
     "A Kestrel surveyor checks your roof's age, structure, angle and shading, plus your electrical panel, in about an hour."),
)

ALPACA_INSTRUCTIONS = (
    "Reply to the customer as Kira from Kestrel Home Solar.",
    "You are Kira, the sales assistant of Kestrel Home Solar. Answer the message below briefly.",
    "Respond to this Kestrel Home Solar customer in one to three sentences.",
    "Answer the following customer question in a friendly, accurate way.",
    "Write Kira's reply to this message.",
)

_FORMATTER = string.Formatter()
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def slots_of(template: str) -> set[str]:
    """Return the slot names used by a ``str.format`` template."""
    return {field for _, field, _, _ in _FORMATTER.parse(template) if field}


def make_profile(rng: random.Random) -> dict[str, str]:
    """Draw one fictional customer and the values derived from their bill/roof."""
    name = rng.choice(NAMES)
    bill = rng.randrange(90, 335, 5)
    roof = rng.randrange(600, 2100, 100)
    system_kw = round(bill / 24, 1)
    email = rng.choice(EMAIL_PATTERNS).format(first=name.lower(), num=rng.randint(10, 99))
    return {
        "name": name,
        "city": rng.choice(CITIES),
        "bill": str(bill),
        "roof": f"{roof:,}",
        "email": email,
        "system_kw": f"{system_kw:g}",
        "panels": str(math.ceil(system_kw * 1000 / 400)),
        "price_low": f"{round(system_kw * 2200, -2):,.0f}",
        "price_high": f"{round(system_kw * 2600, -2):,.0f}",
        "max_panels": str(int(roof * 0.5 / 21)),
    }


DERIVED_SLOTS = {
    "bill": ("system_kw", "panels", "price_low", "price_high"),
    "roof": ("max_panels",),
}


def learn(known: set[str], new: set[str]) -> None:
    """Add slots the customer just revealed (plus derived ones) to ``known``."""
    for slot in new:
        known.add(slot)
        known.update(DERIVED_SLOTS.get(slot, ()))


def pick_reply(rng: random.Random, options: tuple[str, ...], known: set[str], fresh: set[str]) -> str:
    """Pick an assistant template whose slots are all known.

    Templates that use a slot the customer has just revealed are preferred, so
    the reply acknowledges it (e.g. quoting their bill or confirming their email).
    """
    usable = [t for t in options if slots_of(t) <= known]
    revealed: set[str] = set()
    learn(revealed, fresh)
    preferred = [t for t in usable if slots_of(t) & revealed]
    return rng.choice(preferred or usable)


def exchange(rng: random.Random, stage: str, profile: dict[str, str], known: set[str],
             follow_up: bool) -> tuple[str, str]:
    """Build one (user, assistant) pair for ``stage``, updating ``known`` slots.

    ``follow_up`` allows a short acknowledgement ("Thanks. ") before the user text.
    """
    topic = TEMPLATES[stage][rng.choice(sorted(TEMPLATES[stage]))]
    user_t = rng.choice(topic["user"])
    fresh = slots_of(user_t) - known
    learn(known, fresh)
    reply_t = pick_reply(rng, topic["assistant"], known, fresh)
    prefix = rng.choice(USER_FOLLOWUP_PREFIXES) if follow_up else ""
    return prefix + user_t.format(**profile), reply_t.format(**profile)


def stage_path(rng: random.Random) -> list[str]:
    """Choose the final stage, then an ordered subset of the stages before it."""
    final = rng.choices(range(len(STAGES)), weights=FINAL_STAGE_WEIGHTS)[0]
    n_ex = rng.choices(list(EXCHANGE_WEIGHTS), weights=list(EXCHANGE_WEIGHTS.values()))[0]
    n_ex = min(n_ex, final + 1)
    earlier = sorted(rng.sample(range(final), n_ex - 1))
    return [STAGES[i] for i in earlier + [final]]


def make_conversation(rng: random.Random) -> dict:
    """Build one multi-turn conversation record."""
    profile = make_profile(rng)
    known: set[str] = set()
    messages = []
    if rng.random() < SYSTEM_RATE:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    stages = stage_path(rng)
    for i, stage in enumerate(stages):
        follow_up = i > 0 and stages[i - 1] != "greeting"
        user, reply = exchange(rng, stage, profile, known, follow_up)
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": reply})
    return {"messages": messages, "stage": stages[-1]}


def make_alpaca_rows(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Build ``n`` single-turn alpaca rows; about half have an empty input."""
    rows = [{"instruction": ins, "input": "", "output": out} for ins, out in ALPACA_EXTRA_TASKS]
    n_empty = n // 2 - len(rows)
    with_input = [False] * n_empty + [True] * (n - n_empty - len(rows))
    rng.shuffle(with_input)
    seen = {row["instruction"] for row in rows}
    qa_stages = STAGES[1:]  # greetings are not useful as standalone Q&A
    for has_input in with_input:
        while True:
            stage = rng.choice(qa_stages)
            question, answer = exchange(rng, stage, make_profile(rng), set(), follow_up=False)
            if question not in seen:
                seen.add(question)
                break
        if has_input:
            rows.append({"instruction": rng.choice(ALPACA_INSTRUCTIONS), "input": question, "output": answer})
        else:
            rows.append({"instruction": question, "input": "", "output": answer})
    rng.shuffle(rows)
    return rows


def check_reply(text: str) -> None:
    """Assert the house style of an assistant reply."""
    assert "Kestrel" in text, text
    assert len(text.split()) < MAX_ASSISTANT_WORDS, text
    assert 1 <= len(_SENTENCE_END.findall(text)) <= MAX_ASSISTANT_SENTENCES, text
    assert "{" not in text and "}" not in text, text


def check_conversation(record: dict) -> None:
    """Assert roles alternate user/assistant and the chat ends on the assistant."""
    msgs = record["messages"]
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    assert body and len(body) % 2 == 0 and len(body) <= 8
    for i, msg in enumerate(body):
        assert msg["role"] == ("user" if i % 2 == 0 else "assistant")
        if msg["role"] == "assistant":
            check_reply(msg["content"])
    assert record["stage"] in STAGES


def generate(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (conversations, alpaca_rows), deduplicated and validated."""
    rng = random.Random(seed)
    conversations: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(conversations) < n:
        attempts += 1
        if attempts > n * 50:
            raise RuntimeError(f"could only build {len(conversations)} unique conversations")
        record = make_conversation(rng)
        key = json.dumps(record["messages"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        check_conversation(record)
        conversations.append(record)
    alpaca = make_alpaca_rows(rng, N_ALPACA)
    for row in alpaca:
        check_reply(row["output"])
    return conversations, alpaca


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as UTF-8 JSONL with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="output folder (default: data/ next to this script)")
    parser.add_argument("--n", type=int, default=300, help="number of chat conversations")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    parser.add_argument("--eval-n", type=int, default=30, help="held-out conversations, none identical to a training one")
    args = parser.parse_args(argv)

    conversations, alpaca = generate(args.n, args.seed)
    seen = {json.dumps(c["messages"]) for c in conversations}
    held_out = [c for c in generate(args.eval_n * 3, args.seed + 1000)[0] if json.dumps(c["messages"]) not in seen]
    paths = {
        "sales_chat.jsonl": conversations,
        "sales_chat_alpaca.jsonl": alpaca,
        "sales_chat_eval.jsonl": held_out[: args.eval_n],
    }
    for name, rows in paths.items():
        write_jsonl(args.out_dir / name, rows)
        print(f"wrote {len(rows)} rows to {args.out_dir / name}")


if __name__ == "__main__":
    main()
