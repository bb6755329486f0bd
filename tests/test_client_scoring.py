"""The client's scoring calls against live tiny servers: /classify and /encode on a reward model served
with --is-embedding (chunked across requests, answers in order), /v1/score on a generation model."""

from __future__ import annotations

import pytest

from rollout import BadRequestError, RolloutClient

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def servers(scoring_rm_server, scoring_lm_server):
    """tests/conftest.py's tiny reward model (--is-embedding) and generation model, shared with
    test_scoring_server."""
    return scoring_rm_server, scoring_lm_server


def test_classify_batches_in_order(servers) -> None:
    rm, _ = servers
    texts = ["a good answer", "a bad answer", "13", "4 + 9 = 13", "no idea"]
    with RolloutClient([rm.url]) as c:
        batched = c.classify(texts, batch_size=2)  # three requests
        single = [c.classify([t])[0] for t in texts]
        ids = c.classify([[1, 2, 3], [4, 5]], batch_size=1)
        assert len(batched) == 5 and all(len(r.embedding) == 1 for r in batched)
        assert [r.reward for r in batched] == pytest.approx([r.reward for r in single], abs=1e-5)
        assert len({round(r.reward, 6) for r in batched}) > 1  # a real head, not a constant
        assert [r.prompt_tokens for r in ids] == [3, 2] and batched[0].weight_version == "default"
        assert [r.embedding[0] for r in c.encode(texts[:2])] == pytest.approx([r.reward for r in batched[:2]])


def test_score_and_errors(servers) -> None:
    rm, lm = servers
    with RolloutClient([lm.url]) as c:
        scores = c.score([1, 2, 3], [[4], [5, 6], [7]], label_token_ids=[10, 11], apply_softmax=True, batch_size=2)
        assert len(scores) == 3 and all(sum(s) == pytest.approx(1.0, abs=1e-5) for s in scores)
        with pytest.raises(BadRequestError, match="--is-embedding"):
            c.classify(["hi"])
    with RolloutClient([rm.url]) as c:
        with pytest.raises(BadRequestError, match="generation model"):
            c.generate([[1, 2]])
