"""The dispatcher's record of claims it may take back after a transient failure."""

from uuid import uuid4

from services.dispatcher.resumable import ResumableClaims


def test_a_kept_claim_is_held_until_forgotten():
    claims = ResumableClaims()
    claim = uuid4()
    claims.keep(7, claim)
    assert claims.held(7) == claim
    claims.forget(7)
    assert claims.held(7) is None
    claims.forget(7)


def test_the_newest_claim_of_a_follow_up_is_the_one_held():
    claims = ResumableClaims()
    newer = uuid4()
    claims.keep(7, uuid4())
    claims.keep(7, newer)
    assert claims.held(7) == newer
    assert len(claims) == 1


def test_the_oldest_claims_go_first_once_the_bound_is_reached():
    claims = ResumableClaims(limit=2)
    first, second, third = uuid4(), uuid4(), uuid4()
    claims.keep(1, first)
    claims.keep(2, second)
    claims.keep(1, first)  # kept again: now the newest
    claims.keep(3, third)
    assert (claims.held(1), claims.held(2), claims.held(3)) == (first, None, third)
