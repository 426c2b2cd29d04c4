"""Writes questions.jsonl: times-table questions with their answers, as a user's own data would be.

    python examples/times_tables/make_data.py

Generated here (seeded), not taken from anywhere: 300 rows {"question", "answer", "a", "b"}.
"""

import json
import os
import random

rng = random.Random(2026)
rows = []
for _ in range(300):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    rows.append({"question": f"What is {a} times {b}?", "answer": str(a * b), "a": a, "b": b})
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "questions.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
