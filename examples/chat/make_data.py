"""Writes examples/chat/chat.jsonl: a small chat dataset in three domains, for the worked example.

    python examples/chat/make_data.py        # deterministic; the repository ships its output

Three domains of clearly different difficulty, each record a ``messages`` conversation with a
``domain`` field: ``arithmetic`` (short exact answers), ``capitals`` (recall from a fixed table,
some conversations with a system prompt and two turns), and ``explain`` (longer free-text
answers, where ROUGE-L is the natural score). It stands in for your own data: replace the file
and keep the commands.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa",
    "Egypt": "Cairo", "Norway": "Oslo", "India": "New Delhi", "Chile": "Santiago", "Spain": "Madrid",
    "Ghana": "Accra", "Poland": "Warsaw", "Vietnam": "Hanoi", "Cuba": "Havana", "Greece": "Athens",
    "Mexico": "Mexico City", "Sweden": "Stockholm", "Turkey": "Ankara", "Brazil": "Brasilia", "Italy": "Rome",
}
TOPICS = {
    "a prime number": "a whole number greater than one whose only divisors are one and itself",
    "an even number": "a whole number that can be divided by two with nothing left over",
    "a triangle": "a flat shape with three straight sides and three corners",
    "a square": "a flat shape with four equal sides and four right angles",
    "a fraction": "a number written as one whole number over another, meaning a part of a whole",
    "a verb": "a word that names an action or a state, such as run or be",
    "a noun": "a word that names a person, a place or a thing",
    "a river": "a large natural stream of water that flows towards a sea or a lake",
    "a planet": "a large body that travels around a star and does not shine by itself",
    "an island": "a piece of land with water all around it",
}
STYLES = ["What is {}?", "Explain what {} is.", "Can you tell me what {} is?", "In one sentence, what is {}?"]


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    ask = rng.choice(["What is {} {} {}?", "Compute {} {} {}.", "{} {} {} = ?"]).format(a, op, b)
    return {"domain": "arithmetic", "messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": f"{a} {op} {b} = {value}."}]}


def capitals(rng: random.Random) -> dict:
    country, first = rng.sample(sorted(CAPITALS), 2)
    turns = [{"role": "user", "content": f"What is the capital of {country}?"},
             {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."}]
    if rng.random() < 0.3:  # a system prompt and a second turn: loss on both assistant turns
        turns = [{"role": "system", "content": "You answer geography questions in one sentence."}, *turns,
                 {"role": "user", "content": f"And of {first}?"},
                 {"role": "assistant", "content": f"The capital of {first} is {CAPITALS[first]}."}]
    return {"domain": "capitals", "messages": turns}


def explain(rng: random.Random) -> dict:
    topic = rng.choice(sorted(TOPICS))
    answer = f"{topic[0].upper()}{topic[1:]} is {TOPICS[topic]}."
    if rng.random() < 0.5:
        answer += " For example, " + rng.choice(["you can find one in a school book", "it comes up in many lessons", "it is easy to spot once you know the rule"]) + "."
    return {"domain": "explain", "messages": [{"role": "user", "content": rng.choice(STYLES).format(topic)}, {"role": "assistant", "content": answer}]}


def main(n_per_domain: int = 120, seed: int = 0) -> None:
    rng = random.Random(seed)
    records = [make(rng) for make in (arithmetic, capitals, explain) for _ in range(n_per_domain)]
    rng.shuffle(records)
    out = Path(__file__).with_name("chat.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
