"""The verifiable toy task of the GRPO examples: "What is a + b?" for one-digit a and b.

Reward 1.0 when the correct sum is among the first three integers of the answer ("4 + 9 = 13" counts,
"The answer is 13." counts, a rambling answer that never states it does not), else 0.0. SmolLM2-135M-
Instruct gets it about 10-20% of the time at temperature 1 (it rambles, or answers with prose), which is
low but nonzero, so every batch has groups with a reward signal and the policy learns the format fast.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    prompt_ids: list[int]

    @property
    def answer(self) -> int:
        return self.a + self.b


class AdditionTask:
    def __init__(self, tokenizer, seed: int = 0):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def question(self, a: int, b: int) -> str:
        return f"What is {a} + {b}? Answer with just the number."

    def sample(self, count: int) -> list[Problem]:
        out = []
        for _ in range(count):
            a, b = self.rng.randint(1, 9), self.rng.randint(1, 9)
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": self.question(a, b)}],
                                                      add_generation_prompt=True, tokenize=False)
            out.append(Problem(a, b, self.tokenizer(text, add_special_tokens=False)["input_ids"]))
        return out

    @staticmethod
    def reward(problem: Problem, answer_text: str) -> float:
        numbers = [int(m) for m in _INT.findall(answer_text)[:3]]
        return 1.0 if problem.answer in numbers else 0.0
