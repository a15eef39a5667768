"""A request's seed always repeats its text, whatever its size or sign.

llama.cpp reads the 32-bit seed 0xFFFFFFFF (``LLAMA_DEFAULT_SEED``) as "pick a random one", so the seeds
that ended there once masked to 32 bits (-1, 2**32 - 1, 2**33 - 1) sampled differently on every request.
"""

from __future__ import annotations

import pytest
import requests


@pytest.mark.parametrize("seed", [-1, 2**32 - 1, 2**33 - 1, 2**64 + 5])
def test_a_seed_of_any_size_repeats_its_text(real_worker: str, seed: int) -> None:
    body = {"prompt": "My favourite animal is the", "max_tokens": 12, "temperature": 1.5, "top_k": 0, "seed": seed}
    texts = {
        requests.post(real_worker + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        for _ in range(3)
    }
    assert len(texts) == 1
