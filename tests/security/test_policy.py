"""The transport-free parts of security: roles and grants, tenant namespaces, key strings, token buckets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedpool.errors import PermissionDenied
from embedpool.security import keys
from embedpool.security.principal import Action, Principal, Role, authorize
from embedpool.security.quota import TokenBucket
from embedpool.security.tenancy import DEFAULT_TENANT, TENANT_NAME, qualify, unqualify
from embedpool.service.limits import COLLECTION_NAME

tenants = st.from_regex(TENANT_NAME, fullmatch=True)
names = st.from_regex(COLLECTION_NAME, fullmatch=True)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("action", list(Action))
def test_a_role_may_do_what_its_rank_covers(role: Role, action: Action) -> None:
    principal = Principal(tenant=DEFAULT_TENANT if action is Action.MANAGE_SYNCS else "t", role=role)
    allowed = {Role.READER: {Action.EMBED, Action.READ}, Role.WRITER: {Action.EMBED, Action.READ, Action.WRITE}}
    if action in allowed.get(role, set(Action)):
        authorize(principal, action, "c")
    else:
        with pytest.raises(PermissionDenied):
            authorize(principal, action, "c")


def test_a_collection_grant_is_a_glob() -> None:
    principal = Principal(tenant="t", role=Role.ADMIN, collections="team-*")
    authorize(principal, Action.WRITE, "team-a")
    authorize(principal, Action.EMBED)  # no collection, nothing to grant
    with pytest.raises(PermissionDenied, match="not granted"):
        authorize(principal, Action.READ, "other")
    with pytest.raises(PermissionDenied, match="granted every collection"):  # or it could grant itself "*"
        authorize(principal, Action.MANAGE_KEYS)
    authorize(Principal(tenant="t", role=Role.ADMIN), Action.MANAGE_KEYS)


def test_only_the_operators_admin_keys_manage_syncs() -> None:
    """A sync reads what the server's database role can read: not a tenant's power, nor a partial grant's."""
    authorize(Principal(tenant="default", role=Role.ADMIN), Action.MANAGE_SYNCS)
    for principal in (
        Principal(tenant="t", role=Role.ADMIN),
        Principal(tenant="default", role=Role.ADMIN, collections="team-*"),
        Principal(tenant="default", role=Role.WRITER),
    ):
        with pytest.raises(PermissionDenied):
            authorize(principal, Action.MANAGE_SYNCS)


@given(tenants, names)
def test_a_tenant_gets_back_exactly_its_own_names(tenant: str, name: str) -> None:
    stored = qualify(tenant, name)
    assert unqualify(tenant, stored) == name


@given(tenants, tenants, names)
def test_no_tenant_can_name_another_tenants_collection(a: str, b: str, name: str) -> None:
    """Names a caller can send (COLLECTION_NAME: no "/") never reach another tenant's namespace."""
    if a != b:
        assert qualify(a, name) != qualify(b, name)
        assert unqualify(b, qualify(a, name)) is None


def test_the_default_tenant_keeps_the_names_made_before_keys() -> None:
    assert qualify(DEFAULT_TENANT, "docs") == "docs"
    assert unqualify(DEFAULT_TENANT, "docs") == "docs"
    assert unqualify(DEFAULT_TENANT, "acme/docs") is None


def test_keys_parse_and_match_only_their_own_secret() -> None:
    text, parsed = keys.generate()
    assert keys.parse(text) == parsed
    stored = keys.secret_hash(parsed.secret)
    assert keys.matches(parsed, stored)
    other = keys.parse(keys.generate()[0])
    assert other is not None and not keys.matches(other, stored)
    for bad in ("", "ep_", text + "x", text.replace("ep_", "xx_"), text.upper()):
        assert keys.parse(bad) is None


@given(
    rate=st.floats(0.5, 1000),
    calls=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 2000)), min_size=1, max_size=40),
)
def test_a_bucket_never_admits_more_than_its_rate_allows(rate: float, calls: list[tuple[float, int]]) -> None:
    """Over any run, what was taken is at most one burst (the bucket's capacity, or the first oversized
    call) plus the rate times the time that passed."""
    bucket = TokenBucket(rate, stamp=0.0)
    now, taken, largest = 0.0, 0, 0
    for gap, n in calls:
        now += gap
        if bucket.take(n, now) == 0.0:
            taken += n
            largest = max(largest, n)
    assert taken <= max(bucket.capacity, largest) + rate * now + 1e-6 * max(1.0, taken)


def test_a_refused_call_is_told_a_wait_after_which_it_passes() -> None:
    bucket = TokenBucket(10.0, stamp=0.0)
    assert bucket.take(10, 0.0) == 0.0
    wait = bucket.take(5, 0.1)
    assert wait == pytest.approx(0.4)
    assert bucket.take(5, 0.1 + wait) == 0.0
