"""TLS and mutual TLS to the VTN, with the VTN's message signatures checked against a pinned fingerprint.

Throw-away certificates are made per test: a CA, the VTN's server certificate (for 127.0.0.1) and the VEN's
client certificate, plus a second CA whose certificates neither side may accept.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from openleadr import utils

from dr_bridge.localvtn import LocalVtn, VtnTls
from dr_bridge.openadr import Ven
from tests.test_openadr import Recorder, response, soon

MIN = dt.timedelta(minutes=1)


class Pki:
    """A CA that issues PEM files into a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = self._write(f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))

    def _write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)

    def issue(self, common_name: str, server: bool) -> tuple[str, str]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                                self.cert.subject, key.public_key())
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return (self._write(f"{self.name}-{common_name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{self.name}-{common_name}.key", key_pem))


def fingerprint(cert_path: str) -> str:
    return utils.certificate_fingerprint(Path(cert_path).read_bytes())


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path, "utility")


@pytest.fixture
def rogue(tmp_path) -> Pki:
    return Pki(tmp_path, "rogue")


@pytest.fixture
async def vtn(pki: Pki) -> AsyncIterator[LocalVtn]:
    cert, key = pki.issue("vtn", server=True)
    server = LocalVtn(poll_s=0.5, tls=VtnTls(cert=cert, key=key, ca_file=pki.ca_file))
    await server.start()
    yield server
    await server.stop()


async def start_ven(vtn: LocalVtn, rec: Recorder, cert: str, key: str, ca_file: str, pin: str) -> Ven:
    ven = Ven(vtn_url=vtn.url, ven_name="ev-fleet", on_event=rec.on_event, on_registered=rec.on_registered,
              on_event_list=rec.on_event_list, cert=cert, key=key, ca_file=ca_file, vtn_fingerprint=pin,
              backoff_initial_s=0.2, backoff_max_s=1.0)
    asyncio.get_running_loop().create_task(ven.run())
    return ven


async def test_mutual_tls_with_pinned_vtn_fingerprint_registers_and_answers_events(vtn, pki):
    assert vtn.url.startswith("https://")
    cert, key = pki.issue("ven", server=False)
    rec = Recorder()
    ven = await start_ven(vtn, rec, cert, key, pki.ca_file, fingerprint(vtn.tls.cert))
    try:
        await vtn.wait_for(lambda: ven.registered, 15)
        # The VTN bound the VEN's client-certificate fingerprint to its registration.
        assert vtn.registrations[-1]["fingerprint"] == fingerprint(cert)
        event_id = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 2)])
        await vtn.wait_for(lambda: rec.seen(event_id), 15)
        assert await vtn.wait_for(lambda: response(vtn, event_id), 15) == "optIn"
    finally:
        await ven.stop()


async def test_wrong_vtn_fingerprint_is_refused(vtn, pki, caplog):
    caplog.set_level(logging.WARNING)
    cert, key = pki.issue("ven", server=False)
    rec = Recorder()
    other, _ = pki.issue("impostor", server=True)
    ven = await start_ven(vtn, rec, cert, key, pki.ca_file, fingerprint(other))
    try:
        await asyncio.sleep(3)
        assert not ven.registered and rec.registered == []
        assert "fingerprint" in caplog.text.lower()
    finally:
        await ven.stop()


@pytest.mark.parametrize("who", ["VEN certificate from another CA", "VEN trusts another CA"])
async def test_certificates_outside_the_chain_are_refused(vtn, pki, rogue, who, caplog):
    if who == "VEN certificate from another CA":
        cert, key = rogue.issue("ven", server=False)
        ca_file = pki.ca_file
    else:
        cert, key = pki.issue("ven", server=False)
        ca_file = rogue.ca_file
    rec = Recorder()
    ven = await start_ven(vtn, rec, cert, key, ca_file, fingerprint(vtn.tls.cert))
    try:
        await asyncio.sleep(3)
        assert not ven.registered and vtn.registrations == []
        assert "registration attempt" in caplog.text  # logged, and retried with backoff
    finally:
        await ven.stop()


async def test_bridge_configured_for_mutual_tls_acts_on_an_event(tmp_path, vtn, pki):
    """The [vtn] cert/key/ca_file/vtn_fingerprint keys, as an operator sets them, through the whole bridge."""
    from dr_bridge.config import config_from_dict
    from dr_bridge.daemon import Bridge
    from dr_bridge.rig import API_KEY, Rig, StationSpec
    from tests.test_core import calls, soon as soon_s

    rig = Rig(tmp_path, [StationSpec("A")])
    await rig.start()
    await rig.vtn.stop()
    rig.vtn = vtn
    cert, key = pki.issue("ven", server=False)
    data = rig.config_dict()
    data["vtn"].update(url=vtn.url, cert=cert, key=key, ca_file=pki.ca_file,
                       vtn_fingerprint=fingerprint(vtn.tls.cert))
    bridge = Bridge(config_from_dict(data), API_KEY, vtn_backoff_s=0.2)
    await bridge.start()
    try:
        await vtn.wait_for(lambda: bridge.ven.registered, 15)
        vtn.add_event(bridge.ven.ven_id, intervals=[(soon_s(2), dt.timedelta(seconds=3), 2)])
        await vtn.wait_for(lambda: ("clear_power_limit", {}) in calls(rig, "A"), 20)
        assert calls(rig, "A") == [("set_power_limit", {"unit": "current", "limit": 16}), ("clear_power_limit", {})]
    finally:
        await bridge.stop()
        await rig.sim.stop()
