"""The ring routes as decree's Rust SDK does (the Rust integration test
tests/tests/python.rs compares 10,000 keys against the Rust ring itself)."""

from decree.ring import Ring, Routing, hash64


def test_hash_matches_the_documented_function():
    # The same vectors as proto/src/ring.rs (FNV-1a 64, then fmix64).
    assert hash64(b"") == 0xEFD01F60BA992926
    assert hash64(b"a") == 0x82A2A958A9BECE5B
    assert hash64(b"account-1") == 0x4EA96E947D43B847
    assert hash64(b"p1#0") == 0xEC623844A2DD46C2


def test_routing_is_deterministic_and_order_free():
    a = Ring.of(["p1", "p2", "p3"])
    b = Ring.of(["p3", "p1", "p2", "p1"])
    keys = [f"key-{i}" for i in range(2000)]
    assert [a.route(k) for k in keys] == [b.route(k) for k in keys]
    assert {a.route(k) for k in keys} == {"p1", "p2", "p3"}


def test_an_empty_ring_routes_nowhere():
    assert Ring([]).route("a") is None


def test_weight_scales_the_share():
    ring = Ring([("p1", 1), ("p2", 3)])
    keys = [f"k{i}" for i in range(8000)]
    heavy = sum(ring.route(k) == "p2" for k in keys) / len(keys)
    assert 0.70 < heavy < 0.80, heavy


def test_a_migration_moves_keys_behind_its_cursor_only():
    current, target = Ring.of(["p1", "p2"]), Ring.of(["p1", "p2", "p3"])
    routing = Routing(epoch=2, current=current, target=target, cursor=b"key-5")
    for i in range(1000):
        key = f"key-{i}"
        expected = target.route(key) if key.encode() < b"key-5" else current.route(key)
        assert routing.route(key) == expected
    done = Routing(epoch=3, current=current, target=target, cursor_end=True)
    assert all(done.route(f"k{i}") == target.route(f"k{i}") for i in range(500))
