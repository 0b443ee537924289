import pytest

from fleetbisect.verdict import DEFAULT_POLICY, Outcome, OutcomeKind, Verdict, decide

K = OutcomeKind


def o(kind, summary="x"):
    return Outcome(kind, summary)


@pytest.mark.parametrize(
    "kinds, verdict",
    [
        ([K.PASS], Verdict.GOOD),
        ([K.PASS, K.PASS, K.PASS], Verdict.GOOD),
        ([K.FAIL], Verdict.BAD),
        ([K.HANG], Verdict.BAD),
        ([K.PASS, K.HANG], Verdict.BAD),  # a regression that shows once is enough
        ([K.BOOT_FAILED], Verdict.SKIP),
        ([K.WRONG_KERNEL], Verdict.SKIP),
        ([K.BUILD_FAILED], Verdict.SKIP),
        ([K.FAIL, K.WRONG_KERNEL], Verdict.SKIP),  # one untrustworthy run spoils the step
        ([], Verdict.SKIP),
    ],
)
def test_outcomes_to_verdict(kinds, verdict):
    assert decide([o(k) for k in kinds]).verdict is verdict


def test_exit_codes_follow_git_bisect_run():
    assert [v.exit_code for v in Verdict] == [0, 1, 125, 128]


def test_infra_error_is_retried_then_aborts_never_marks():
    outcomes = [o(K.INFRA_ERROR, "host gone")]
    assert decide(outcomes, attempt=1, retries=2).verdict is None
    assert decide(outcomes, attempt=2, retries=2).verdict is None
    last = decide(outcomes, attempt=3, retries=2)
    assert last.verdict is Verdict.ABORT
    assert "host gone" in last.reason


def test_infra_error_wins_over_a_bad_looking_run():
    assert decide([o(K.HANG), o(K.INFRA_ERROR)], attempt=1, retries=0).verdict is Verdict.ABORT


def test_policy_can_bisect_a_boot_failure():
    policy = dict(DEFAULT_POLICY, **{K.BOOT_FAILED: "bad"})
    assert decide([o(K.BOOT_FAILED)], policy).verdict is Verdict.BAD


def test_policy_can_treat_hang_as_skip():
    policy = dict(DEFAULT_POLICY, **{K.HANG: "skip"})
    assert decide([o(K.HANG)], policy).verdict is Verdict.SKIP


@pytest.mark.parametrize("kind", [K.WRONG_KERNEL, K.INFRA_ERROR, K.BUILD_FAILED])
@pytest.mark.parametrize("action", ["good", "bad"])
def test_untested_outcomes_can_never_become_good_or_bad(kind, action):
    with pytest.raises(ValueError):
        decide([o(kind)], dict(DEFAULT_POLICY, **{kind: action}))
