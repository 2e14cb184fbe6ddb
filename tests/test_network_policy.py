"""The network policy's shape, checked before anything starts (tierbox.network)."""

from __future__ import annotations

import pytest

from tierbox import Egress, NetworkPolicy, PortMap, SandboxSpec, make_spec
from tierbox.errors import NotSupportedError, SpecError, UsageError
from tierbox.network import pin
from tierbox.tiers import get_tier, tier_names


def fake_dns(name: str) -> list[str]:
    return {"api.example.com": ["192.0.2.7", "192.0.2.7", "2001:db8::5"]}[name]


@pytest.mark.parametrize(
    ("entry", "hosts", "ports"),
    [
        ("192.0.2.7:443", ["192.0.2.7/32"], (443, 443)),
        ("10.0.0.0/24:8000-8100", ["10.0.0.0/24"], (8000, 8100)),
        ("[2001:db8::1]:53", ["2001:db8::1/128"], (53, 53)),
        ("api.example.com:443", [], (443, 443)),
    ],
)
def test_allow_entries_parse(entry: str, hosts: list[str], ports: tuple[int, int]) -> None:
    (rule,) = Egress(allow=[entry]).rules
    assert list(rule.addresses) == hosts
    assert (rule.port_min, rule.port_max) == ports


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("api.example.com", "write HOST:PORT"),
        ("192.0.2.7:0", "out of range"),
        ("192.0.2.7:65536", "out of range"),
        ("192.0.2.7:http", "write a number"),
        ("10.0.0.1/24:80", "host bits set"),
        ("192.0.2.7:90-80", "runs backwards"),
        ("bad_name!:80", "bad host"),
        ("", "bad allow-list entry"),
    ],
)
def test_bad_allow_entries_name_what_is_wrong(entry: str, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        Egress(allow=[entry])


def test_allow_must_be_a_list() -> None:
    with pytest.raises(SpecError, match="allow is a list"):
        Egress(allow="192.0.2.7:443")  # type: ignore[arg-type]


def test_names_are_pinned_once_and_mapped_in_hosts() -> None:
    e = pin(Egress(allow=["api.example.com:443", "192.0.2.9:80"]), fake_dns)
    assert e.pinned
    assert e.rules[0].addresses == ("192.0.2.7/32", "2001:db8::5/128")
    assert e.hosts() == {"api.example.com": ("192.0.2.7", "2001:db8::5")}
    assert pin(e, lambda n: pytest.fail("a pinned name is not resolved again")) == e


def test_a_name_that_does_not_resolve_is_an_error_before_anything_starts() -> None:
    def nxdomain(name: str) -> list[str]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(SpecError, match=r"'nothing\.invalid'.*does not resolve"):
        pin(Egress(allow=["nothing.invalid:443"]), nxdomain)


def test_spec_round_trips_with_pinned_addresses_and_ports() -> None:
    spec = make_spec(
        "busybox",
        network=pin(Egress(["api.example.com:443"], dns=True), fake_dns),
        ports=["8080:80"],
    )
    back = SandboxSpec.from_dict(spec.to_dict())
    assert back == spec and back.network_mode is NetworkPolicy.EGRESS
    assert isinstance(back.network, Egress) and back.network.rules == spec.network.rules  # type: ignore[union-attr]
    assert back.ports == (PortMap(80, 8080),)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("80", PortMap(80)),
        ("8080:80", PortMap(80, 8080)),
        ("0.0.0.0:8080:80", PortMap(80, 8080, "0.0.0.0")),
    ],
)
def test_port_mappings_parse_like_docker(text: str, want: PortMap) -> None:
    assert PortMap.parse(text) == want


@pytest.mark.parametrize("text", ["", "x:80", "8080:", "8080:99999", "nohost:1:2"])
def test_bad_port_mappings_are_refused(text: str) -> None:
    with pytest.raises(SpecError):
        PortMap.parse(text)


def test_bad_network_values_are_refused() -> None:
    with pytest.raises(SpecError, match="not a network policy"):
        make_spec("busybox", network="bridge")
    with pytest.raises(UsageError, match="two mappings publish one host port"):
        make_spec("busybox", ports=["8080:80", "8080:81"])


def test_a_tier_that_cannot_give_a_policy_says_which_can() -> None:
    for name in tier_names():
        tier = get_tier(name)
        for mode in NetworkPolicy:
            network = Egress(["192.0.2.7:80"]) if mode is NetworkPolicy.EGRESS else mode
            spec = make_spec("busybox", network=network)
            if mode in tier.capabilities.networks:
                tier.check_spec(spec)
                continue
            with pytest.raises(NotSupportedError, match=f"cannot give network={mode.value}"):
                tier.check_spec(spec)
